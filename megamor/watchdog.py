"""Hang watchdog: a stalled rank ends the job in minutes, saying which rank, where, and why.

Ranks report their step and phase (megamor/progress.py) into a node-local directory. One
watcher per node reads it, outside every rank: the `megamor pretrain --nproc N` launcher itself
(launch/local.py), or, under Slurm, a small process that the node's first task starts
(`python -m megamor.watchdog`, from launch/slurm.py). Each watcher publishes its node's records
to `<run>/logs/progress/node_<N>.json` every few seconds, so that every watcher sees every rank.

When no rank has advanced for the hang limit, the watcher of every node
  1. writes the Python stacks of its ranks (faulthandler on SIGUSR2; py-spy too when installed)
     to `<run>/logs/hang-<launch>/rank_<R>.txt`, with the rank's phase, process state and
     kernel wait channel;
  2. one of them prints one line naming the rank(s) that did not reach the collective (those
     whose (step, phase) is behind the others'; on a tie, a process that is stopped or in
     uninterruptible I/O) and writes `<run>/hung.json` (also appended to `logs/hangs.jsonl`);
  3. kills its ranks; the job ends with EXIT_HUNG (76), which the Slurm scripts requeue: the
     next run resumes from the last checkpoint.

One setting, `run.hang_timeout` (`Timeouts`), decides every timeout, each above the one before:
  hang limit     T: the value given, or auto: 10 x the median step, at least 5 minutes (at most
                 25); 0 turns the watchdog off. Start-up, the first step, checkpoint saves and
                 evaluations get the collective timeout less a minute instead, so a long save
                 is never called a hang, yet a save stuck for good is still reported.
  collective     gloo / NCCL timeout of every process group: T + 5 minutes (auto or off: 30
                 minutes), in whole minutes.
  NCCL watchdog  TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: the collective timeout + 1 minute; async
                 error handling on, and the flight recorder dumped into `<run>/logs/` on a
                 collective timeout (`nccl_env`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from megamor.progress import (LABELS, ORDER, PROGRESS_DIR_ENV, SLOW_PHASES, STACK_SIGNAL,
                              default_base, read_records, stacks_path)

EXIT_HUNG = 76  # a stalled rank ended the job; retryable: requeue and resume
HUNG_MARKER = "hung.json"
AUTO_STEP_FACTOR = 10
AUTO_FLOOR_S = 300.0
AUTO_CAP_S = 1500.0
COLLECTIVE_MARGIN_S = 300.0
SLOW_PHASE_MARGIN_S = 60.0
NCCL_HEARTBEAT_MARGIN_S = 60
POLL_S = 1.0
# Process states (psutil) in which a rank cannot make progress by itself.
FROZEN_STATES = {"stopped": "stopped (SIGSTOP or a debugger)", "tracing-stop": "stopped by a tracer",
                 "disk-sleep": "in uninterruptible I/O (D state)"}


# ----------------------------------------------------------------------------- timeouts


@dataclass(frozen=True)
class Timeouts:
    """Every timeout of a run, from `run.hang_timeout` (None: auto, 0: off, else seconds)."""

    hang: Optional[float]

    @property
    def enabled(self) -> bool:
        return self.hang != 0

    @property
    def collective_s(self) -> int:
        """gloo / NCCL collective timeout, in whole minutes (megatron takes minutes): above the
        largest hang limit the watchdog can use, so that the watchdog reports a stall first."""
        top = self.hang if self.hang else AUTO_CAP_S
        return int(math.ceil((top + COLLECTIVE_MARGIN_S) / 60.0)) * 60

    @property
    def slow_phase_s(self) -> float:
        """The limit while any rank starts up, saves a checkpoint or evaluates."""
        return self.collective_s - SLOW_PHASE_MARGIN_S

    @property
    def nccl_heartbeat_s(self) -> int:
        return self.collective_s + NCCL_HEARTBEAT_MARGIN_S

    def step_limit(self, median_step_s: Optional[float]) -> float:
        """The hang limit between steps' phases."""
        if self.hang:
            return float(self.hang)
        if median_step_s is None:
            return self.slow_phase_s
        return min(max(AUTO_STEP_FACTOR * median_step_s, AUTO_FLOOR_S), AUTO_CAP_S)

    def describe(self) -> str:
        if not self.enabled:
            return (f"hang watchdog off (run.hang_timeout=0); collective timeout "
                    f"{self.collective_s} s")
        hang = (f"{self.hang:g} s" if self.hang else
                f"{AUTO_STEP_FACTOR} x the median step ({AUTO_FLOOR_S:g}-{AUTO_CAP_S:g} s)")
        return (f"hang watchdog: limit {hang}; start-up, checkpoint saves and evaluation "
                f"{self.slow_phase_s:g} s; collective timeout {self.collective_s} s")


def timeouts(cfg) -> Timeouts:
    return Timeouts(cfg.run.hang_timeout)


def banner_lines(cfg, watched: bool) -> list[str]:
    """Rank 0's start-up lines about the watchdog (when a watcher runs) and stale settings."""
    t = timeouts(cfg)
    lines = [f"megamor: {t.describe()}"] if watched else []
    if os.environ.get("MEGAMOR_DIST_TIMEOUT_MIN"):
        lines.append(f"megamor: MEGAMOR_DIST_TIMEOUT_MIN is no longer read: the collective "
                     f"timeout ({t.collective_s} s) follows run.hang_timeout (docs/cluster.md)")
    return lines


def parse_hang(text: str) -> Optional[float]:
    return None if text in ("auto", "none", "") else float(text)


def nccl_env(t: Timeouts, logs_dir: Path) -> dict[str, str]:
    """The NCCL watchdog settings a GPU rank runs with (each only where the environment does
    not set it already; see `prepare_collectives`):

    - TORCH_NCCL_ASYNC_ERROR_HANDLING=3: a collective that times out (or fails) ends the process
      instead of leaving it blocked (torch's own default, stated so an inherited 0 is visible);
    - TORCH_NCCL_ENABLE_MONITORING=1, TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC = collective timeout + 60:
      a rank whose NCCL watchdog thread itself hangs (a CUDA call that never returns) is aborted,
      but only after the hang watchdog and the collective timeout had their turn;
    - TORCH_NCCL_TRACE_BUFFER_SIZE=2000, TORCH_NCCL_DUMP_ON_TIMEOUT=1,
      TORCH_NCCL_DEBUG_INFO_TEMP_FILE=<run>/logs/nccl_trace_rank_: on a collective timeout every
      rank writes its flight recorder (the last collectives and their state) next to the stacks.
    """
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(t.nccl_heartbeat_s),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(Path(logs_dir) / "nccl_trace_rank_"),
    }


def prepare_collectives(cfg, device_type: str, env=os.environ) -> tuple[int, dict[str, str]]:
    """Before torch.distributed starts in a rank: the collective timeout (seconds) for every
    process group, and on a GPU the NCCL environment of `nccl_env`, set where unset (a value the
    operator exported wins). Returns (timeout, the variables this call set)."""
    t = timeouts(cfg)
    applied = {}
    if device_type == "cuda":
        for k, v in nccl_env(t, Path(cfg.run.output_dir) / "logs").items():
            if k not in env:
                env[k] = v
                applied[k] = v
    return t.collective_s, applied


# ----------------------------------------------------------------------------- the decision


@dataclass
class Verdict:
    stalled_s: float
    limit_s: float
    limit_why: str
    laggards: list[dict]
    waiting: list[dict]
    missing: list[int] = field(default_factory=list)

    @property
    def tie(self) -> bool:
        return not self.laggards and not self.missing


def _pos(rec: Mapping) -> tuple[int, int]:
    return int(rec.get("step", 0)), ORDER.get(rec.get("phase"), 0)


def stall_limit(records: Iterable[Mapping], t: Timeouts) -> Optional[tuple[float, str]]:
    """(limit in seconds, why) for these ranks' current phases; None when the watchdog is off."""
    recs = list(records)
    if not t.enabled or not recs:
        return None
    slow = sorted({r["phase"] for r in recs if r.get("phase") in SLOW_PHASES})
    if slow:
        return t.slow_phase_s, f"during {', '.join(LABELS[p] for p in slow)}"
    medians = [r.get("median_step_s") for r in recs]
    if any(m is None for m in medians):
        return t.slow_phase_s, "until a step has completed"
    if t.hang:
        return float(t.hang), "run.hang_timeout"
    med = max(medians)
    return t.step_limit(med), f"auto: {AUTO_STEP_FACTOR} x the median step {med:.3g} s"


def judge(records: Mapping[int, Mapping], world_size: int, t: Timeouts, now: float,
          slack_s: float = 0.0) -> Optional[Verdict]:
    """A hang when no rank has advanced for the limit (plus `slack_s`: how stale other nodes'
    records may be). Records marked `stale` (their node stopped publishing) count as missing."""
    known = {r: rec for r, rec in records.items()
             if not rec.get("stale") and {"t", "step", "phase"} <= rec.keys()}
    lim = stall_limit(known.values(), t)
    if lim is None:
        return None
    limit, why = lim
    stalled = now - max(float(rec["t"]) for rec in known.values())
    if stalled < limit + slack_s:
        return None
    top = max(_pos(r) for r in known.values())
    laggards = sorted((r for r in known.values() if _pos(r) < top), key=lambda r: r["rank"])
    waiting = sorted((r for r in known.values() if _pos(r) == top), key=lambda r: r["rank"])
    missing = sorted(set(range(world_size)) - set(known))
    if not laggards and not missing:
        # Everybody is at the same place: name a process that cannot run (stopped, D state).
        frozen = [r for r in waiting if r.get("state") in FROZEN_STATES]
        if frozen and len(frozen) < len(waiting):
            laggards = frozen
            waiting = [r for r in waiting if r not in frozen]
    return Verdict(stalled, limit, why, laggards, waiting, missing)


def _ranks_text(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def _where(rec: Mapping) -> str:
    return f"{LABELS.get(rec.get('phase'), rec.get('phase'))} at step {rec.get('step')}"


def _who(rec: Mapping) -> str:
    extra = [f"pid {rec.get('pid')} on {rec.get('host')}"]
    if rec.get("state") in FROZEN_STATES:
        extra.append(FROZEN_STATES[rec["state"]])
    elif rec.get("state") == "exited":
        extra.append("exited")
    return f"rank {rec['rank']} in {_where(rec)} ({', '.join(extra)})"


def verdict_line(v: Verdict, stacks_dir: Path) -> str:
    """The one line printed when the watchdog ends a job."""
    head = (f"megamor: hang: no rank advanced for {v.stalled_s:.0f} s (limit {v.limit_s:.0f} s, "
            f"{v.limit_why})")
    parts = []
    if v.laggards:
        shown = "; ".join(_who(r) for r in v.laggards[:8])
        more = f"; and {len(v.laggards) - 8} more" if len(v.laggards) > 8 else ""
        parts.append(f"did not reach the collective: {shown}{more}")
    if v.missing:
        parts.append(f"no progress report from rank{'s' if len(v.missing) > 1 else ''} "
                     f"{_ranks_text(v.missing)} (its node or node watcher is unresponsive)")
    if v.waiting:
        ranks = _ranks_text([r["rank"] for r in v.waiting])
        if v.tie:
            parts.append(f"all {len(v.waiting)} ranks are in {_where(v.waiting[0])} and none is "
                         f"behind: a collective that does not complete (network, NCCL, or a "
                         f"process stuck inside it)")
        else:
            who = f"rank {ranks} waits" if len(v.waiting) == 1 else f"ranks {ranks} wait"
            parts.append(f"{who} in {_where(v.waiting[0])}")
    return (f"{head}: {'; '.join(parts)}; stacks in {stacks_dir}/; exiting with {EXIT_HUNG} "
            f"(retryable: resume with --resume auto)")


# ----------------------------------------------------------------------------- the watcher


def _process(rec: Mapping):
    """The live psutil.Process of a record (pid and start time match), else None."""
    import psutil
    try:
        p = psutil.Process(int(rec["pid"]))
        if rec.get("start") and abs(p.create_time() - float(rec["start"])) > 1.0:
            return None
        return p
    except (psutil.Error, ValueError, KeyError):
        return None


def _state(rec: Mapping) -> str:
    import psutil
    p = _process(rec)
    if p is None:
        return "exited"
    try:
        return p.status()
    except psutil.Error:
        return "exited"


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return "?"


class NodeWatcher:
    """Watches the ranks of one node (all of them under `megamor pretrain --nproc N`)."""

    def __init__(self, progress_dir: Path, output_dir: Path, t: Timeouts, world_size: int,
                 local_ranks: int, node: int = 0, launch: str = "", tag: str = "",
                 checkpoint_dir: Optional[Path] = None, out=None):
        self.progress_dir, self.output_dir = Path(progress_dir), Path(output_dir)
        self.t, self.world_size, self.local_ranks, self.node = t, world_size, local_ranks, node
        self.launch = launch or f"local-{os.getpid()}-{time.time():.0f}"
        self.tag = tag or time.strftime("%Y%m%d-%H%M%S")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir \
            else self.output_dir / "checkpoints"
        self.out = out
        self.shared = self.output_dir / "logs" / "progress"
        self.publish_s = min(5.0, max(1.0, (t.hang or AUTO_FLOOR_S) / 4))
        self.multi_node = world_size > local_ranks
        self.stacks_dir = self.output_dir / "logs" / f"hang-{self.tag}"
        self._last_poll = self._last_publish = 0.0
        self.local: dict[int, dict] = {}
        self.seen_local = False
        self.owns_dir = False  # remove the progress directory at the end
        self.broken = False

    # --- reading and publishing

    def read_local(self) -> dict[int, dict]:
        recs = read_records(self.progress_dir)
        for rec in recs.values():
            rec["state"] = _state(rec)
        if recs:
            self.seen_local = True
        self.local = recs
        return recs

    def publish(self, now: float, dumped: bool = False) -> None:
        doc = {"launch": self.launch, "node": self.node, "published": now,
               "watcher_pid": os.getpid(), "dumped": dumped,
               "ranks": [self.local[r] for r in sorted(self.local)]}
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            path = self.shared / f"node_{self.node}.json"
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError:
            pass  # the shared directory may be briefly unavailable; publish again next time
        self._last_publish = now

    def read_nodes(self, now: float) -> dict[int, dict]:
        """Other nodes' published documents of this launch: node -> doc (with `stale`)."""
        out = {}
        for p in self.shared.glob("node_*.json"):
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("launch") != self.launch or doc.get("node") == self.node:
                continue
            doc["stale"] = now - float(doc.get("published", 0)) > 3 * self.publish_s + 10
            out[int(doc["node"])] = doc
        return out

    def all_records(self, now: float) -> dict[int, dict]:
        recs = {r: dict(rec) for r, rec in self.local.items()}
        if self.multi_node:
            for doc in self.read_nodes(now).values():
                for rec in doc.get("ranks", []):
                    recs.setdefault(int(rec["rank"]), dict(rec, stale=doc["stale"]))
        return recs

    def poll(self, now: Optional[float] = None, force: bool = False) -> Optional[Verdict]:
        """Read, publish when due, judge; at most once per POLL_S unless forced. A failure of
        the watcher itself is reported once and never ends the job it watches."""
        now = time.time() if now is None else now
        if self.broken or (not force and now - self._last_poll < POLL_S):
            return None
        self._last_poll = now
        try:
            return self._poll(now)
        except Exception as e:  # noqa: BLE001 - the watcher must not end a healthy job
            self.broken = True
            print(f"WARNING: hang watchdog stopped watching node {self.node}: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None

    def _poll(self, now: float) -> Optional[Verdict]:
        self.read_local()
        if now - self._last_publish >= self.publish_s:
            self.publish(now)
        if not self.t.enabled or not self.local:
            return None
        slack = self.publish_s + 2.0 if self.multi_node else 0.0
        return judge(self.all_records(now), self.world_size, self.t, now, slack)

    def local_ranks_gone(self) -> bool:
        return self.seen_local and all(_process(rec) is None for rec in self.local.values())

    # --- ending the job

    def dump_stacks(self, wait_s: float = 15.0, settle_s: float = 1.0) -> list[Path]:
        """Every local rank's Python stacks into `stacks_dir/rank_<R>.txt`: each rank's dump is
        copied once its file has grown and then not changed for `settle_s` (a busy node may
        take a while to run the handler of every rank), at most `wait_s` after the signal."""
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        pending = {}
        written = []
        for r, rec in sorted(self.local.items()):
            src = stacks_path(self.progress_dir, r)
            before = src.stat().st_size if src.exists() else 0
            p = _process(rec)
            state = rec["state"] = _state(rec)  # now, not at the last poll
            dest = self.stacks_dir / f"rank_{r}.txt"
            with open(dest, "w") as f:
                f.write(f"rank {r} (pid {rec.get('pid')} on {rec.get('host')}, node {self.node}): "
                        f"{_where(rec)} for {now - float(rec['t']):.1f} s; process state "
                        f"{state}; kernel wait channel {_wchan(int(rec.get('pid', 0)))}\n")
                if p is not None and state not in ("stopped", "tracing-stop", "zombie"):
                    try:
                        os.kill(p.pid, STACK_SIGNAL)
                        pending[r] = (src, before, dest)
                    except OSError as e:
                        f.write(f"(could not signal it: {e})\n")
                elif p is not None:
                    f.write(f"(the process is {FROZEN_STATES.get(state, state)}: it cannot write "
                            f"its Python stack until it runs again)\n")
            written.append(dest)
        deadline = time.time() + wait_s
        sizes: dict[int, tuple[int, float]] = {}  # rank -> (size, since when)
        while pending and time.time() < deadline:
            time.sleep(0.1)
            for r, (src, before, dest) in list(pending.items()):
                size = src.stat().st_size if src.exists() else 0
                if size != sizes.get(r, (None, 0))[0]:
                    sizes[r] = (size, time.time())
                elif size > before and time.time() - sizes[r][1] >= settle_s:
                    self._copy_dump(src, before, dest)
                    del pending[r]
        for r, (src, before, dest) in pending.items():
            self._copy_dump(src, before, dest, note="(no complete stack within "
                                                    f"{wait_s:g} s of the signal)\n")
        py_spy = shutil.which("py-spy")
        if py_spy:
            for r, rec in sorted(self.local.items()):
                if _process(rec) is None:
                    continue
                try:
                    res = subprocess.run([py_spy, "dump", "--pid", str(rec["pid"]), "--nonblocking"],
                                         capture_output=True, text=True, timeout=20)
                    text = res.stdout + res.stderr
                except (OSError, subprocess.SubprocessError) as e:
                    text = f"{type(e).__name__}: {e}\n"
                with open(self.stacks_dir / f"rank_{r}.txt", "a") as f:
                    f.write("\n--- py-spy dump --nonblocking\n" + text)
        return written

    @staticmethod
    def _copy_dump(src: Path, offset: int, dest: Path, note: str = "") -> None:
        try:
            with open(src, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        with open(dest, "a") as f:
            f.write(note + text)

    def _claim(self) -> bool:
        """One watcher of the launch prints the line and writes the marker."""
        if not self.multi_node:
            return True
        key = hashlib.sha1(self.launch.encode()).hexdigest()[:12]
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.shared / f".verdict-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
        except OSError:
            return self.node == 0

    def _wait_for_nodes(self, grace_s: float) -> None:
        """Until every node's watcher has dumped its stacks (a silent node is not waited for),
        at most `grace_s`."""
        deadline = time.time() + grace_s
        while time.time() < deadline:
            docs = self.read_nodes(time.time())
            ranks = set(self.local) | {int(x["rank"]) for d in docs.values()
                                       for x in d.get("ranks", [])}
            if len(ranks) >= self.world_size and all(d.get("dumped") or d["stale"]
                                                     for d in docs.values()):
                return
            time.sleep(0.5)

    def end_job(self, v: Verdict, kill: Callable[[], None], grace_s: float = 20.0) -> str:
        """Stacks, the line and the marker (one watcher), then `kill` this node's ranks."""
        self.dump_stacks()
        now = time.time()
        self.publish(now, dumped=True)
        line = verdict_line(v, self.stacks_dir)
        marker = self.output_dir / HUNG_MARKER
        if self.multi_node:
            self._wait_for_nodes(grace_s)
            v = judge(self.all_records(time.time()), self.world_size, self.t, time.time(), 0) or v
            line = verdict_line(v, self.stacks_dir)
        if self._claim():
            doc = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
                   "stalled_s": round(v.stalled_s, 1), "limit_s": v.limit_s,
                   "laggards": [r["rank"] for r in v.laggards], "missing": v.missing,
                   "where": {str(r["rank"]): {"step": r["step"], "phase": r["phase"],
                                              "state": r.get("state")}
                             for r in v.laggards + v.waiting},
                   "stacks": str(self.stacks_dir), "checkpoint": self._latest(),
                   "launch": self.launch, "line": line}
            try:
                logs = self.output_dir / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                with open(logs / "hangs.jsonl", "a") as f:
                    f.write(json.dumps(doc) + "\n")
                tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
                tmp.write_text(json.dumps(doc, indent=1))
                os.replace(tmp, marker)
            except OSError as e:
                line += f" (could not write {marker}: {e})"
            print(line, file=self.out or sys.stderr, flush=True)
        elif self.multi_node:
            deadline = time.time() + grace_s
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.5)
        kill()
        return line

    def _latest(self) -> Optional[str]:
        try:
            return str(self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip())
        except OSError:
            return None

    def close(self, remove_dir: bool) -> None:
        if remove_dir:
            shutil.rmtree(self.progress_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- launchers


def local_watcher(cfg, nproc: int) -> Optional[NodeWatcher]:
    """The watcher of `megamor pretrain --nproc N` (None when run.hang_timeout=0). Its progress
    directory is MEGAMOR_PROGRESS_DIR if set, else a fresh one under /dev/shm."""
    t = timeouts(cfg)
    if not t.enabled:
        return None
    from megamor.preflight import checkpoint_root
    given = os.environ.get(PROGRESS_DIR_ENV)
    if given:
        d = Path(given)
    else:
        import tempfile

        import psutil
        base = default_base()
        for old in base.glob("megamor-progress-*-*"):  # of launchers killed with -9
            pid = old.name.split("-")[2]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        d = Path(tempfile.mkdtemp(prefix=f"megamor-progress-{os.getpid()}-", dir=base))
    w = NodeWatcher(d, Path(cfg.run.output_dir), t, nproc, nproc,
                    checkpoint_dir=checkpoint_root(cfg))
    w.owns_dir = not given
    return w


def node_progress_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The progress directory every task of this node derives alike (MEGAMOR_PROGRESS_DIR, else
    under /dev/shm, named after the launch and the node)."""
    if env.get(PROGRESS_DIR_ENV):
        return Path(env[PROGRESS_DIR_ENV])
    from megamor.errors import launch_id
    key = hashlib.sha1(launch_id(env).encode()).hexdigest()[:12]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return default_base() / f"megamor-{uid}-{key}-n{_node(env)}"


def _node(env: Mapping[str, str]) -> str:
    """This node's index: NODE_RANK (launch/slurm.py), GROUP_RANK (torchrun)."""
    return env.get("NODE_RANK") or env.get("GROUP_RANK") or "0"


def launch_tag(env: Mapping[str, str] = os.environ) -> str:
    """A readable name for this launch's stacks directory."""
    if env.get("SLURM_JOB_ID"):
        return f"job{env['SLURM_JOB_ID']}-r{env.get('SLURM_RESTART_COUNT', '0')}"
    return time.strftime("%Y%m%d-%H%M%S")


def start_node_watcher(cfg, env: Mapping[str, str] = os.environ) -> Optional[subprocess.Popen]:
    """In a task launched by Slurm or torchrun (launch/slurm.py), before training: set this
    task's progress directory; on the node's first task (LOCAL_RANK 0) start the node's watcher
    process. It ignores the stop signals (Slurm signals every process of a step), dies with the
    task that started it, and ends when the node's ranks have exited."""
    t = timeouts(cfg)
    d = node_progress_dir(env)
    os.environ[PROGRESS_DIR_ENV] = str(d)
    if not t.enabled or env.get("LOCAL_RANK", "0") != "0":
        return None
    from megamor.errors import launch_id
    from megamor.lifecycle import STOP_SIGNALS, parent_death_signal_setter
    from megamor.preflight import checkpoint_root
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE") or world)
    cmd = [sys.executable, "-m", "megamor.watchdog", "--progress-dir", str(d),
           "--output-dir", str(cfg.run.output_dir), "--checkpoint-dir", str(checkpoint_root(cfg)),
           "--hang-timeout", "auto" if t.hang is None else f"{t.hang:g}",
           "--world-size", str(world), "--local-ranks", str(local),
           "--node", _node(env), "--launch", launch_id(env),
           "--tag", launch_tag(env)]
    # SIGHUP, not SIGKILL, when the task ends: the watcher removes its directory and exits.
    die_with_task = parent_death_signal_setter(signal.SIGHUP)

    def shielded():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # inherited through exec
        die_with_task()

    return subprocess.Popen(cmd, preexec_fn=shielded, stdin=subprocess.DEVNULL)


def _kill_ranks(records: Iterable[Mapping]) -> None:
    """SIGKILL each rank and its helper processes (not this watcher); the rank that started this
    watcher last (its death ends the watcher too)."""
    import psutil
    me, parent = os.getpid(), os.getppid()
    procs = [p for p in (_process(r) for r in records) if p is not None]
    procs.sort(key=lambda p: p.pid == parent)
    for p in procs:
        try:
            victims = [c for c in p.children(recursive=True) if c.pid != me] + [p]
        except psutil.Error:
            victims = [p]
        for v in victims:
            try:
                v.kill()
            except psutil.Error:
                pass


def main(argv=None) -> int:
    """The per-node watcher of a Slurm (or torchrun) launch; started by `start_node_watcher`."""
    ap = argparse.ArgumentParser(prog="python -m megamor.watchdog", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--progress-dir", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--hang-timeout", default="auto")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--local-ranks", type=int, required=True)
    ap.add_argument("--node", type=int, default=0)
    ap.add_argument("--launch", default="")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    parent = os.getppid()

    def task_ended(signum, frame):
        raise SystemExit(0)  # through `finally`: the node-local directory is removed

    signal.signal(signal.SIGHUP, task_ended)
    w = NodeWatcher(Path(a.progress_dir), Path(a.output_dir), Timeouts(parse_hang(a.hang_timeout)),
                    a.world_size, a.local_ranks, a.node, a.launch, a.tag,
                    Path(a.checkpoint_dir) if a.checkpoint_dir else None, out=sys.stdout)
    try:
        while os.getppid() == parent:
            time.sleep(POLL_S)
            v = w.poll()
            if v is not None:
                def kill():
                    w.close(remove_dir=True)  # first: killing the last rank ends this process
                    _kill_ranks(w.local.values())
                w.end_job(v, kill=kill)
                return EXIT_HUNG
            if w.local_ranks_gone():
                break
    finally:
        w.close(remove_dir=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
