"""Run a megamor command on N local ranks through torchrun (the same env:// path a cluster uses).

`megamor pretrain --nproc 2 ...` re-executes itself as
`python -m torch.distributed.run --standalone --nproc-per-node 2 -m megamor.cli pretrain ...`,
so a laptop run and a multi-node run go through the same rendezvous and rank variables.
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cpu_threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, nproc))


def relaunch(nproc: int, argv: list[str]) -> int:
    """Start `nproc` ranks of `python -m megamor.cli argv...` on this machine; return exit code."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megamor.cli", *argv]
    return subprocess.call(cmd, env=env)
