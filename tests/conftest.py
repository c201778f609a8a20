import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "scenarios"


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory):
    """One embedded-corpus dataset for the whole session (built on first use by the ranks)."""
    return tmp_path_factory.mktemp("builtin")


def run_ranks(nproc: int, script: str, args: list[str], timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Start `nproc` gloo ranks of a scenario script through torchrun (or one plain process)."""
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    path = str(SCENARIOS / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", path, *args]
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_kinds(tmp_path, builtin_root, nproc: int, kinds: list[str], overrides: list[str]) -> dict:
    out = tmp_path / f"result-{nproc}-{abs(hash((tuple(kinds), tuple(overrides))))}.json"
    run_ranks(nproc, "train_kinds.py", ["--out", str(out), "--kinds", ",".join(kinds),
                                        f"data.builtin_root={builtin_root}",
                                        f"run.output_dir={tmp_path / 'run'}", *overrides])
    return json.loads(out.read_text())
