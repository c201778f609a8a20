"""Where each rank is: its step and phase, written where a watcher outside the rank can read it.

Every rank of a launched job (`megamor pretrain --nproc N`, Slurm tasks started by
`launch/slurm.py`) gets MEGAMOR_PROGRESS_DIR, a directory on its own node that the node's hang
watcher (megamor/node_watcher.py) reads. The rank keeps two files there:

    rank_<R>.json     one record, rewritten in place (a pwrite of a fixed 512 bytes: no file
                      created, renamed or closed) at every phase change, a few times per step:
                      {"rank", "pid", "start", "host", "node", "step", "phase", "seq", "t",
                       "median_step_s"}
    rank_<R>.stacks   where `faulthandler` writes every thread's Python stack when the rank gets
                      SIGUSR2 (STACK_SIGNAL): the watcher sends it when it declares a hang; an
                      operator may send it too (`kill -USR2 <pid>`)

The directory is node-local (/dev/shm by default): the per-phase writes never touch the shared
file system; the watcher publishes a summary there at a low rate.

Phases, in the order one step goes through them (a rank whose (step, phase) is behind the others'
is the one that has not reached their collective):

    startup, data, forward_backward, grad_sync, optimizer, metrics, evaluation, step_end,
    checkpoint, finishing

Test hook: MEGAMOR_TEST_DELAY="<phase>@<rank>[#<step>]=<seconds>[,...]" makes a rank sleep on
entering a phase (every step, or only at <step>): a slow data path (`data@1=0.2`), a slow
checkpoint save (`checkpoint@0#3=12`). Tests only.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

PROGRESS_DIR_ENV = "MEGAMOR_PROGRESS_DIR"
TEST_DELAY_ENV = "MEGAMOR_TEST_DELAY"
STACK_SIGNAL = signal.SIGUSR2
RECORD_BYTES = 512

PHASES = ("startup", "data", "forward_backward", "grad_sync", "optimizer", "metrics",
          "evaluation", "step_end", "checkpoint", "finishing")
ORDER = {p: i for i, p in enumerate(PHASES)}
# Phases that may legitimately take longer than the hang timeout: the watcher gives them the
# collective timeout instead (start-up also covers the first step's one-off costs).
SLOW_PHASES = frozenset({"startup", "checkpoint", "evaluation", "finishing"})
LABELS = {
    "startup": "start-up", "data": "data (loading its batch)",
    "forward_backward": "forward/backward", "grad_sync": "gradient sync (all-reduce)",
    "optimizer": "optimizer step", "metrics": "metrics (all-reduce)",
    "evaluation": "evaluation (depth map)", "step_end": "end of step (signal check)",
    "checkpoint": "checkpoint save", "finishing": "finishing",
}


def record_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank}.json"


def stacks_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank_{rank}.stacks"


def default_base() -> Path:
    """/dev/shm (memory, node-local) when usable, else the temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def parse_test_delays(text: str) -> list[tuple[str, int, Optional[int], float]]:
    """`data@1=0.2,checkpoint@0#3=12` -> [(phase, rank, step or None, seconds), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            where, seconds = item.split("=")
            phase, at = where.split("@")
            rank, _, step = at.partition("#")
            if phase not in ORDER:
                raise ValueError(phase)
            out.append((phase, int(rank), int(step) if step else None, float(seconds)))
        except ValueError:
            raise ValueError(f"{TEST_DELAY_ENV}={text!r}: cannot read {item!r} (expected "
                             f"<phase>@<rank>[#<step>]=<seconds>, phase one of "
                             f"{', '.join(PHASES)})") from None
    return out


class Progress:
    """A rank's progress reporting. `enter(phase, step)` at every phase change; listeners (the
    straggler timer) are called with the phase. Without a progress directory nothing is written
    and only the listeners run."""

    def __init__(self, rank: int, directory: Optional[Path] = None, node: int = 0):
        self.rank, self.node = rank, node
        self.directory = Path(directory) if directory else None
        self.listeners: list[Callable[[str], None]] = []
        self.phase, self.step, self.seq = "startup", 0, 0
        self._fd: Optional[int] = None
        self._stacks = None
        self._steps: deque = deque(maxlen=50)  # seconds between consecutive steps' data phases
        self._median: Optional[float] = None
        self._last_data: Optional[tuple[int, float]] = None
        self._delays = [d for d in parse_test_delays(os.environ.get(TEST_DELAY_ENV, ""))
                        if d[1] == rank]
        self._static = {"rank": rank, "pid": os.getpid(), "start": _process_start(),
                        "host": socket.gethostname()[:64], "node": node}
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(record_path(self.directory, rank), os.O_RDWR | os.O_CREAT,
                                   0o644)
                # faulthandler writes from its C signal handler: every thread's Python stack,
                # even while the main thread is blocked inside a collective.
                self._stacks = open(stacks_path(self.directory, rank), "w")
            except OSError as e:  # training goes on, unwatched
                print(f"WARNING: rank {rank}: progress directory {self.directory} unusable "
                      f"({e}); the hang watchdog cannot see this rank", file=sys.stderr,
                      flush=True)
                self.directory, self._fd = None, None
            else:
                faulthandler.register(STACK_SIGNAL, file=self._stacks, all_threads=True)
                self._write()

    @classmethod
    def from_env(cls, rank: int, env=os.environ) -> "Progress":
        d = env.get(PROGRESS_DIR_ENV)
        node = env.get("NODE_RANK") or env.get("GROUP_RANK") or "0"
        return cls(rank, Path(d) if d else None, int(node) if node.isdigit() else 0)

    def enter(self, phase: str, step: int) -> None:
        now = time.time()
        if phase == "data" and (self._last_data is None or self._last_data[0] != step):
            if self._last_data is not None and step == self._last_data[0] + 1:
                self._steps.append(now - self._last_data[1])
                self._median = statistics.median(self._steps)
            self._last_data = (step, now)
        self.phase, self.step = phase, step
        self.seq += 1
        self._write(now)
        for listener in self.listeners:
            listener(phase)
        for p, _, at, seconds in self._delays:
            if p == phase and (at is None or at == step):
                time.sleep(seconds)

    def median_step_s(self) -> Optional[float]:
        """Median seconds per step over the last 50 steps (None before two steps)."""
        return self._median

    def _write(self, now: Optional[float] = None) -> None:
        if self._fd is None:
            return
        rec = dict(self._static, step=self.step, phase=self.phase, seq=self.seq,
                   t=now or time.time(), median_step_s=self.median_step_s())
        data = json.dumps(rec).encode()[:RECORD_BYTES - 1]
        try:
            os.pwrite(self._fd, data.ljust(RECORD_BYTES - 1) + b"\n", 0)
        except OSError:
            pass  # reporting must never stop training

    def close(self) -> None:
        if self._fd is not None:
            faulthandler.unregister(STACK_SIGNAL)
            os.close(self._fd)
            self._stacks.close()
            self._fd = None


def read_record(path: Path) -> Optional[dict]:
    """One rank's record; None if absent or caught mid-write (read again on the next poll)."""
    try:
        with open(path, "rb") as f:
            data = f.read(RECORD_BYTES)
        rec = json.loads(data.decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and "rank" in rec else None


def read_records(directory: Path) -> dict[int, dict]:
    out = {}
    for p in Path(directory).glob("rank_*.json"):
        rec = read_record(p)
        if rec is not None:
            out[int(rec["rank"])] = rec
    return out


def _process_start() -> float:
    try:
        import psutil
        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - identification only
        return 0.0
