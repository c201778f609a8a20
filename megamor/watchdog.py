"""Hang watchdog: a stalled rank ends the job in minutes, saying which rank, where, and why.

Ranks report their step and phase (megamor/progress.py) into a node-local directory. One
watcher per node reads it, outside every rank (megamor/node_watcher.py): the `megamor pretrain
--nproc N` launcher itself (megamor/launch/local.py), or, under Slurm, a small process that the
node's first task starts (`python -m megamor.node_watcher`, from megamor/launch/slurm.py). Each
watcher publishes its node's records to `<run>/logs/progress/node_<N>.json` every few seconds,
so that every watcher sees every rank. This module holds what they decide with: the timeouts,
whether the ranks are stalled (`judge`) and the line that says so (`verdict_line`).

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

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

from megamor.progress import LABELS, ORDER, SLOW_PHASES

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


def where(rec: Mapping) -> str:
    return f"{LABELS.get(rec.get('phase'), rec.get('phase'))} at step {rec.get('step')}"


def _who(rec: Mapping) -> str:
    extra = [f"pid {rec.get('pid')} on {rec.get('host')}"]
    if rec.get("state") in FROZEN_STATES:
        extra.append(FROZEN_STATES[rec["state"]])
    elif rec.get("state") == "exited":
        extra.append("exited")
    return f"rank {rec['rank']} in {where(rec)} ({', '.join(extra)})"


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
            parts.append(f"all {len(v.waiting)} ranks are in {where(v.waiting[0])} and none is "
                         f"behind: a collective that does not complete (network, NCCL, or a "
                         f"process stuck inside it)")
        else:
            who = f"rank {ranks} waits" if len(v.waiting) == 1 else f"ranks {ranks} wait"
            parts.append(f"{who} in {where(v.waiting[0])}")
    return (f"{head}: {'; '.join(parts)}; stacks in {stacks_dir}/; exiting with {EXIT_HUNG} "
            f"(retryable: resume with --resume auto)")
