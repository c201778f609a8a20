import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "scenarios"


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory):
    """One embedded-corpus dataset for the whole session (built on first use by the ranks)."""
    return tmp_path_factory.mktemp("builtin")


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`megamor ARGV` in this process: its exit code and what it printed (stdout + stderr)."""
    from megamor.cli import main
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


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


def run_kinds(tmp_path, builtin_root, nproc: int, kinds: list[str], overrides: list[str],
              flags: tuple = ()) -> dict:
    """tests/scenarios/train_kinds.py over `nproc` ranks (`flags`: its options, e.g. --guard)."""
    out = tmp_path / f"result-{nproc}-{abs(hash((tuple(kinds), tuple(overrides))))}.json"
    run_ranks(nproc, "train_kinds.py", ["--out", str(out), "--kinds", ",".join(kinds), *flags,
                                        f"data.builtin_root={builtin_root}",
                                        f"run.output_dir={tmp_path / 'run'}", *overrides])
    return json.loads(out.read_text())


def freeze_in_data(progress: Path, rank: int, min_step: int, timeout: float = 300,
                   while_waiting=None) -> dict:
    """SIGSTOP `rank` while its progress record (megamor/progress.py, in the node-local
    directory `progress`) says it is loading its batch at a step >= `min_step`, after a step of
    this run completed (so the hang limit, not the start-up allowance, applies); read again
    once it is stopped: it had not moved on. Returns the record. `while_waiting()` runs every
    poll."""
    import psutil
    from megamor.progress import read_record, record_path
    deadline = time.time() + timeout
    while time.time() < deadline:
        if while_waiting is not None:
            while_waiting()
        r = read_record(record_path(progress, rank))
        if r and r["step"] >= min_step and r["phase"] == "data" and r["median_step_s"]:
            os.kill(r["pid"], signal.SIGSTOP)
            while psutil.Process(r["pid"]).status() != psutil.STATUS_STOPPED:
                time.sleep(0.005)
            again = read_record(record_path(progress, rank))
            if again and again["seq"] == r["seq"]:
                return r
            os.kill(r["pid"], signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"rank {rank} never reached step {min_step}: {progress}")
