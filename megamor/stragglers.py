"""Stragglers: how long each rank computes and how long it waits for the others.

Each step, a rank's time between phase changes (megamor/progress.py) is split into
    compute   data, forward/backward, optimizer step
    wait      gradient sync: the data-parallel reduction every rank must reach; a rank that
              computes faster than the others spends the difference waiting here
(metrics, evaluation, checkpoints and the end-of-step signal check are neither). At every
logged step the window's sums are gathered from every rank (one small all-gather) and compared
among the ranks that do the same work (one pipeline stage: its tensor- and data-parallel
ranks): the slowest rank, its compute time over the median's, and the mean fraction of a step
spent waiting. They go into the log line (`| slowest r3 1.42x`), metrics.jsonl and MLflow
(`straggler/*`); a rank that stays at or above `tracking.straggler_threshold` (1.2) for
`tracking.straggler_windows` (3) windows in a row gets a WARNING line and the MLflow tag
`megamor.straggler_warning`.

On a GPU the phase boundaries are CUDA events on the current stream, read at the window's end
(the step's own device-to-host copy has already synchronised): host-side clocks would see only
the kernel launches, and an NCCL collective's waiting happens on the device. On the CPU they are
`time.perf_counter()`. Pipeline stages' point-to-point waits fall inside forward/backward (the
pipeline's own balance is reported by `benchmarks/perf.py`). The DeepSpeed engine runs its
collectives inside its backward and step, so it has no separate wait to measure: no report.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

COMPUTE_PHASES = frozenset({"data", "forward_backward", "optimizer"})
WAIT_PHASES = frozenset({"grad_sync"})


class Sections:
    """Phase boundaries -> (seconds computing, seconds waiting) since the last `take()`."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        self._open: Optional[tuple[str, object]] = None
        self._spans: list[tuple[str, object, object]] = []

    def _marker(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        now = self._marker()
        if self._open is not None:
            prev, start = self._open
            kind = "compute" if prev in COMPUTE_PHASES else "wait" if prev in WAIT_PHASES else None
            if kind:
                self._spans.append((kind, start, now))
        self._open = (phase, now)

    def take(self) -> tuple[float, float]:
        spans, self._spans = self._spans, []
        if self.cuda and spans:
            spans[-1][2].synchronize()
        out = {"compute": 0.0, "wait": 0.0}
        for kind, a, b in spans:
            out[kind] += a.elapsed_time(b) / 1000.0 if self.cuda else b - a
        return out["compute"], out["wait"]


class Stragglers:
    """The per-window report. `close_window` is a collective: every rank calls it at every
    logged step (or none does: `enabled` is the same on every rank)."""

    def __init__(self, dims, device: torch.device, threshold: float = 1.2, windows: int = 3,
                 measures_wait: bool = True):
        self.dims, self.device = dims, device
        self.threshold, self.windows = threshold, windows
        self.sections = Sections(device.type)
        # Something to compare: more than one rank per pipeline stage.
        self.enabled = measures_wait and dims.world_size // dims.pp > 1
        self.hosts: list[str] = []
        if self.enabled:
            hosts: list = [None] * dims.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            self.hosts = hosts
        self._steps = 0
        self._streak: Optional[tuple[int, int, int]] = None  # (rank, windows, first step)
        self._warned = False

    def step_done(self) -> None:
        self._steps += 1

    def close_window(self, step: int) -> tuple[dict, Optional[str]]:
        """(metrics, warning or None) for the steps since the last call."""
        compute, wait = self.sections.take()
        steps, self._steps = max(self._steps, 1), 0
        if not self.enabled:
            return {}, None
        mine = torch.tensor([float(self.dims.pp_rank), compute / steps, wait / steps],
                            dtype=torch.float64, device=self.device)
        rows = [torch.zeros_like(mine) for _ in range(self.dims.world_size)]
        dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu().tolist()  # [rank] -> [stage, compute/step, wait/step]
        return self.judge(table, step, steps)

    def judge(self, table: list[list[float]], step: int, steps: int) -> tuple[dict, Optional[str]]:
        """The window's report from every rank's [stage, compute per step, wait per step]."""
        worst = None
        for stage in sorted({int(r[0]) for r in table}):
            members = [(rank, r[1], r[2]) for rank, r in enumerate(table) if int(r[0]) == stage]
            median = statistics.median(c for _, c, _ in members)
            rank, slow, _ = max(members, key=lambda m: m[1])
            ratio = slow / median if median > 0 else 1.0
            others = [w / (c + w) for r_, c, w in members if r_ != rank and c + w > 0]
            if worst is None or ratio > worst[1]:
                worst = (rank, ratio, slow, median, others)
        rank, ratio, slow, median, others = worst
        fractions = [w / (c + w) for _, c, w in table if c + w > 0]
        m = {"straggler/rank": rank, "straggler/ratio": ratio,
             "straggler/compute_s": slow, "straggler/median_compute_s": median,
             "straggler/wait_fraction": statistics.fmean(fractions) if fractions else 0.0}
        if ratio >= self.threshold and self._streak and self._streak[0] == rank:
            self._streak = (rank, self._streak[1] + 1, self._streak[2])
        elif ratio >= self.threshold:
            self._streak, self._warned = (rank, 1, step - steps + 1), False
        else:
            self._streak, self._warned = None, False
        warning = None
        if self._streak and self._streak[1] >= self.windows and not self._warned:
            self._warned = True
            host = self.hosts[rank] if rank < len(self.hosts) else "?"
            peers = "its pipeline stage's median rank" if self.dims.pp > 1 else "the median rank"
            wait = f"; the others wait {100 * statistics.fmean(others):.0f}% of their step" \
                if others else ""
            warning = (f"straggler: rank {rank} (on {host}) computed {ratio:.2f}x {peers}'s time "
                       f"for {self._streak[1]} logging windows in a row (steps "
                       f"{self._streak[2]}-{step}){wait}")
        return m, warning


def line_part(m: dict) -> Optional[str]:
    """The log line's piece: `slowest r3 1.42x`."""
    if "straggler/ratio" not in m:
        return None
    return f"slowest r{int(m['straggler/rank'])} {m['straggler/ratio']:.2f}x"
