"""Run a megamor command on N local ranks through torchrun (the same env:// path a cluster uses).

`megamor pretrain --nproc 2 ...` re-executes itself as
`python -m torch.distributed.run --standalone --nproc-per-node 2 -m megamor.cli pretrain ...`,
so a laptop run and a multi-node run go through the same rendezvous and rank variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def cpu_threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, nproc))


def relaunch(nproc: int, argv: list[str], preempted_marker: Optional[Path] = None) -> int:
    """Start `nproc` ranks of `python -m megamor.cli argv...` on this machine; return exit code.

    SIGUSR1 / SIGTERM sent to this process are forwarded to the ranks (torchrun itself does not
    forward SIGUSR1), which then save a checkpoint and stop. torchrun reports any non-zero rank
    exit as 1; the marker file the trainer writes turns that back into EXIT_PREEMPTED.
    """
    from megamor.checkpoint import EXIT_PREEMPTED

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megamor.cli", *argv]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0 and preempted_marker is not None and preempted_marker.exists() \
            and preempted_marker.stat().st_mtime >= started:
        return EXIT_PREEMPTED
    return rc
