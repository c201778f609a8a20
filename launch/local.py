"""Run a megamor command on N local ranks through torchrun (the same env:// path a cluster uses).

`megamor pretrain --nproc 2 ...` re-executes itself as `python -m megamor.launch.torchrun
--standalone --nproc-per-node 2 -m megamor.cli pretrain ...` (torchrun without its own failure
report: the ranks report their errors, see launch/torchrun.py), so a laptop run and a multi-node
run go through the same rendezvous and rank variables.
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


def relaunch(nproc: int, argv: list[str], preempted_marker: Optional[Path] = None,
             ranks_catch_signals: bool = True, watcher=None) -> int:
    """Start `nproc` ranks of `python -m megamor.cli argv...` on this machine; return exit code.

    Stop signals (SIGTERM, SIGUSR1, Ctrl-C's SIGINT) sent to this process go to the rank
    processes only, never to torchrun or to the checkpoint writers the ranks start; a signal
    that arrives while a rank is still starting is delivered once the rank has its handler
    (`ranks_catch_signals`, i.e. checkpoint.save_on_signal). The ranks save, rank 0 writes the
    marker and all exit 0, so torchrun reports nothing; the fresh marker turns that into
    EXIT_PREEMPTED here. A second Ctrl-C, at least a second after the first (a wrapper that
    forwards one keypress to the process group delivers it twice at once), stops everything at
    once, without a checkpoint.

    torchrun runs in its own process group (Ctrl-C reaches only this process) and is killed by
    the kernel if this process dies (kill -9); each rank watches for that and exits too
    (`megamor.lifecycle.exit_with_launcher`).

    `watcher` (megamor.node_watcher.NodeWatcher): this process is the ranks' hang watchdog; when no
    rank advances for the hang limit it writes their stacks, prints one line, stops every rank
    and the launch returns EXIT_HUNG.
    """
    from megamor.lifecycle import (EXIT_PREEMPTED, LAUNCHER_PID_ENV, PREEMPTED_RANK_EXIT_ENV,
                                   STOP_SIGNALS, InterruptCounter, catches_signal,
                                   parent_death_signal_setter)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(nproc)))
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env[PREEMPTED_RANK_EXIT_ENV] = "0"
    if watcher is not None:
        from megamor.progress import PROGRESS_DIR_ENV
        env[PROGRESS_DIR_ENV] = str(watcher.progress_dir)
    cmd = [sys.executable, "-m", "megamor.launch.torchrun", "--standalone",  # torchrun, quieter
           f"--nproc-per-node={nproc}", "-m", "megamor.cli", *argv]
    started = time.time()
    die_with_launcher = parent_death_signal_setter(signal.SIGKILL)

    def in_own_group_dying_with_us():
        os.setpgid(0, 0)
        die_with_launcher()

    proc = subprocess.Popen(cmd, env=env, preexec_fn=in_own_group_dying_with_us)
    pending: dict[int, set[int]] = {}  # signal -> pids of the ranks that already got it
    counter, interrupted_twice = InterruptCounter(), []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and counter.second():  # not one keypress forwarded twice
            interrupted_twice.append(True)
        pending.setdefault(signum, set())

    def ranks() -> list:
        try:
            return psutil.Process(proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return []

    def deliver() -> None:
        for signum, done in list(pending.items()):  # a handler may add to `pending` meanwhile
            for rank in ranks():
                # The trainer installs its handlers for all stop signals together; SIGTERM's
                # tells (Python itself catches SIGINT from the start, as KeyboardInterrupt).
                if rank.pid in done or (ranks_catch_signals
                                        and not catches_signal(rank.pid, signal.SIGTERM)):
                    continue
                try:
                    rank.send_signal(signum)
                    done.add(rank.pid)
                except psutil.NoSuchProcess:
                    pass

    old = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if interrupted_twice:
                stop_at_once(proc, ranks())
                print("megamor: interrupted twice: stopped the ranks without a checkpoint",
                      file=sys.stderr, flush=True)
                return 130
            if pending:
                deliver()
            hang = watcher.poll() if watcher is not None else None
            if hang is not None:
                from megamor.watchdog import EXIT_HUNG
                watcher.end_job(hang, kill=lambda: stop_at_once(proc, ranks()))
                return EXIT_HUNG
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if watcher is not None:
            watcher.close(remove_dir=watcher.owns_dir)
    if preempted_marker is not None and preempted_marker.exists() \
            and preempted_marker.stat().st_mtime >= started:
        return EXIT_PREEMPTED
    return rc


def stop_at_once(proc: subprocess.Popen, ranks: list) -> None:
    """SIGKILL torchrun's process group and each rank's (torchrun starts every rank in a session
    of its own, which also holds the rank's checkpoint writers)."""
    for pgid in [proc.pid] + [r.pid for r in ranks]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
