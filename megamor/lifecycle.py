"""Process lifecycle of a training job: who gets the stop signals, and who dies with whom.

- Stop signals (SIGTERM, SIGUSR1, SIGINT) are meant for the ranks: each finishes its step, the
  job saves a checkpoint and exits 75. `megamor pretrain --nproc N` forwards them to the rank
  processes (torchrun's children) only, once a rank has the trainer's handlers installed
  (`catches_signal`: SIGTERM caught).
- megatron's checkpoint writer keeps a helper process per rank after the first save (the
  spawned multiprocessing Manager behind its results queue). Slurm signals every process of a
  step, and a Ctrl-C or a forwarded signal could reach it too; a dead helper makes every later
  save fail with BrokenPipeError. `start_checkpoint_helper` starts it shielded: it ignores the
  stop signals and dies with its rank.
- A rank exits when its launcher is gone (`exit_with_launcher`): its parent (torchrun,
  slurmstepd) changed, or the `megamor pretrain --nproc N` process named in
  MEGAMOR_LAUNCHER_PID died (kill -9 of the launcher leaves no rank training as an orphan).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on a signal; requeue and resume
PREEMPTED_MARKER = "preempted.json"  # rank 0 writes it into run.output_dir after that save
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_PID_ENV = "MEGAMOR_LAUNCHER_PID"
# Set by `megamor pretrain --nproc N` for its ranks: the exit code of a rank after a signal
# checkpoint (0, so that torchrun does not report the ranks as failed; the launcher returns 75).
PREEMPTED_RANK_EXIT_ENV = "MEGAMOR_PREEMPTED_RANK_EXIT"
EXIT_LAUNCHER_GONE = 1
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A second SIGINT counts as a second interrupt only this long after the first: one Ctrl-C reaches
# a process twice, microseconds apart, when a wrapper forwards it to the process group that the
# terminal already signalled (`timeout --foreground`, some job runners and shells).
SECOND_INTERRUPT_AFTER_S = 1.0


class InterruptCounter:
    """`second()` on each SIGINT: True when it is a second interrupt, i.e. at least
    SECOND_INTERRUPT_AFTER_S after the first one counted."""

    def __init__(self, min_gap_s: float = SECOND_INTERRUPT_AFTER_S):
        self.min_gap_s = min_gap_s
        self.first: Optional[float] = None

    def second(self, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.first is None:
            self.first = now
            return False
        return now - self.first >= self.min_gap_s


def _prctl() -> Optional[Callable]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def parent_death_signal_setter(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A function for a child process (a `preexec_fn`, or its first statement) that asks Linux
    to send `sig` to it when the thread that started it exits; a no-op elsewhere. Resolved in
    the parent so that the child only makes the system call."""
    prctl = _prctl()
    if prctl is None:
        return lambda: None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _shield(parent_pid: int) -> None:
    """Initializer of a checkpoint helper process: the stop signals are for the rank, and the
    helper must not outlive it."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    parent_death_signal_setter(signal.SIGKILL)()
    if os.getppid() != parent_pid:  # the rank died before the line above
        os._exit(EXIT_LAUNCHER_GONE)


def start_checkpoint_helper() -> None:
    """Create megatron's checkpoint results queue (a spawned Manager process that every later
    save reuses) shielded from the stop signals, before megatron creates it unshielded.

    A no-op where megatron keeps no such module-level queue (other versions or strategies).
    Call from the main thread (the parent-death signal follows the creating thread).
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is not None:
        return  # already created, or not how this megatron version writes
    from multiprocessing.managers import SyncManager

    import torch.multiprocessing as mp

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_shield, initargs=(os.getpid(),))
    fa._results_queue = manager.Queue()  # the proxy keeps the manager alive


def catches_signal(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/PID/status).
    True where this cannot be read, so that the signal is delivered as before."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except (OSError, ValueError, IndexError):
        return not os.path.isdir("/proc/self")  # no procfs: cannot tell; deliver
    return False


def _kill_own_children() -> None:
    import psutil
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for c in children:
        try:
            c.kill()
        except psutil.Error:
            pass


def preempted_exit_code(code: int) -> int:
    """The exit code of a rank that saved a checkpoint on a signal: `code` (75), unless its
    launcher asked for another one (PREEMPTED_RANK_EXIT_ENV)."""
    value = os.environ.get(PREEMPTED_RANK_EXIT_ENV, "")
    return int(value) if value.isdigit() else code


def exit_with_launcher(rank: int, poll_s: float = 1.0) -> None:
    """Start a daemon thread that ends this rank (and its helper processes) once its launcher is
    gone: the parent process changed (torchrun or slurmstepd died; the rank was re-parented),
    or the process named in MEGAMOR_LAUNCHER_PID (`megamor pretrain --nproc N`) died."""
    import psutil

    parent = os.getppid()
    launcher = None
    pid = os.environ.get(LAUNCHER_PID_ENV, "")
    if pid.isdigit():
        try:
            launcher = psutil.Process(int(pid))
        except psutil.NoSuchProcess:
            launcher = None
            parent = -1  # already gone: the first check below ends the rank

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                gone = f"its parent process {parent}"
            elif launcher is not None and not alive(launcher):
                gone = f"the launcher (pid {launcher.pid})"
            else:
                time.sleep(poll_s)
                continue
            try:
                print(f"megamor: rank {rank}: {gone} is gone; exiting", file=sys.stderr,
                      flush=True)
            except (OSError, ValueError):
                pass
            _kill_own_children()
            os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watch, name="megamor-launcher-watch", daemon=True).start()
