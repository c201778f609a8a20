"""Is a training step sound? Non-finite steps, loss spikes and router warnings, decided once per
step the same way on every rank, whatever the engine and precision.

- **Non-finite** (`nonfinite_anywhere`): before the optimizer step, each rank looks at its own
  micro-batch losses and its gradients (one reduction per gradient buffer, summed in fp32: a NaN
  or an infinity anywhere makes the sum non-finite, as would gradients summing past fp32's
  3.4e38), and one all-reduce tells every rank. Such a
  step's update is not applied (megatron's optimizer skips only under fp16 loss scaling, so
  the megatron engine decides here; DeepSpeed's ZeRO optimizers skip a non-finite gradient norm
  themselves, which the DeepSpeed engine reads back), the LR schedule advances as for any
  step, and the step is
  counted; `train.on_nonfinite=error` stops at the first one, `skip` after
  `train.max_nonfinite_in_row` in a row (`StepHealth.record`, one line: `NonFiniteError`).
- **Loss spikes**: a finite loss above `tracking.loss_spike_factor` times its running average
  (an exponential average over the last ~20 sound steps, kept in checkpoints) is reported: a
  WARNING line, the metric `loss_spike` (the ratio) and the MLflow tag `megamor.loss_spike`.
- **Router warnings** (`RouterAlerts`): checked every step, printed once per logging window per
  kind, with how many of the window's steps had it; a kind still present is repeated only every
  `REPEAT_WINDOWS` windows.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

EMA_DECAY = 0.95  # running loss average: about the last 20 steps
SPIKE_WARMUP_STEPS = 10  # no spike is called before the average has seen this many steps
REPEAT_WINDOWS = 10


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row (or one, under train.on_nonfinite=error)."""

    kind = "training"


def local_nonfinite(losses: Iterable[torch.Tensor], grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 where any of this rank's losses or gradients holds a NaN or an infinity, else 0.0, as
    a 0-d tensor left on the tensors' device (no host sync: `nonfinite_anywhere` makes the one).
    One reduction per tensor (no copy of the gradients); bf16 and fp32 alike."""
    sums = [l.detach().float().sum() for l in losses]
    sums += [g.sum(dtype=torch.float32) for g in grads if g is not None and g.numel()]
    if not sums:
        return torch.zeros(())
    return (~torch.isfinite(torch.stack(sums)).all()).float()


def nonfinite_anywhere(flag: torch.Tensor, device: torch.device, group=None) -> bool:
    """`flag` (`local_nonfinite`) of any rank: one all-reduce and one host sync, the same answer
    on every rank."""
    import torch.distributed as dist
    t = flag.detach().float().reshape(1).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class StepHealth:
    """Counts non-finite steps and watches the loss against its running average."""

    def __init__(self, on_nonfinite: str, max_in_row: int, spike_factor: float):
        self.on_nonfinite, self.max_in_row, self.spike_factor = on_nonfinite, max_in_row, spike_factor
        self.in_row = 0
        self.first_in_row: Optional[int] = None
        self.skipped = 0
        self.loss_avg: Optional[float] = None
        self.avg_steps = 0

    def state(self) -> dict:
        return {"skipped": self.skipped, "in_row": self.in_row, "first_in_row": self.first_in_row,
                "loss_avg": self.loss_avg, "avg_steps": self.avg_steps}

    def load(self, state: Optional[dict]) -> None:
        for k, v in (state or {}).items():
            if hasattr(self, k):
                setattr(self, k, v)

    def record(self, m: dict, skipped: bool, last_checkpoint=None) -> list[str]:
        """After a step (its metrics `m`, reduced): returns warning lines and adds
        `skipped_steps` / `nonfinite` / `loss_spike` to `m`; raises NonFiniteError when the run
        must stop. `last_checkpoint`: called then, for the checkpoint to name."""
        step, loss = m["step"], m["loss"]
        if skipped or not math.isfinite(loss):
            self.skipped += 1
            self.in_row += 1
            if self.first_in_row is None:
                self.first_in_row = step
            m["nonfinite"] = 1
            m["skipped_steps"] = self.skipped
            what = f"loss {loss:.4g}, gradient norm {m.get('grad_norm', float('nan')):.4g}"
            if self.on_nonfinite == "error" or self.in_row >= self.max_in_row:
                since = (f"steps {self.first_in_row}-{step}" if self.in_row > 1 else f"step {step}")
                last = last_checkpoint() if last_checkpoint is not None else None
                resume = (f"; resume from {last} (e.g. with a lower train.lr)" if last else "")
                rule = ("train.on_nonfinite=error" if self.on_nonfinite == "error" else
                        f"train.max_nonfinite_in_row={self.max_in_row}")
                raise NonFiniteError(
                    f"{self.in_row} step(s) in a row with a non-finite loss or gradient ({since}; "
                    f"last: {what}); no update of them reached the weights; stopped "
                    f"({rule}){resume}")
            return [f"step {step}: non-finite {what}: update skipped ({self.in_row} in a row, "
                    f"{self.skipped} in all; the run stops at "
                    f"train.max_nonfinite_in_row={self.max_in_row} in a row)"]
        self.in_row, self.first_in_row = 0, None
        if self.skipped:
            m["skipped_steps"] = self.skipped
        out = []
        avg = self.loss_avg
        if self.spike_factor and avg is not None and avg > 0 and \
                self.avg_steps >= SPIKE_WARMUP_STEPS and loss > self.spike_factor * avg:
            m["loss_spike"] = loss / avg
            out.append(f"step {step}: loss {loss:.4f} is {loss / avg:.1f}x its running average "
                       f"{avg:.4f} (tracking.loss_spike_factor={self.spike_factor:g})")
        else:  # a spike does not move the average it is judged against
            self.loss_avg = loss if avg is None else EMA_DECAY * avg + (1 - EMA_DECAY) * loss
            self.avg_steps += 1
        return out


class RouterAlerts:
    """Router warnings checked at every step, printed once per logging window and kind."""

    def __init__(self, repeat_windows: int = REPEAT_WINDOWS):
        self.repeat_windows = repeat_windows
        self.window: dict[str, list] = {}  # kind -> [steps seen, last text]
        self.steps = 0
        self.quiet_until: dict[str, int] = {}  # kind -> window index it may be printed again
        self.windows = 0

    def add(self, alerts: list[tuple[str, str]]) -> None:
        """One step's (kind, text) alerts."""
        self.steps += 1
        for kind, text in alerts:
            seen = self.window.setdefault(kind, [0, text])
            seen[0] += 1
            seen[1] = text

    def close(self, step: int) -> list[str]:
        """At a logged step: one line per kind seen in the window (unless repeated too soon)."""
        out = []
        for kind, (n, text) in sorted(self.window.items()):
            if self.quiet_until.get(kind, 0) > self.windows:
                continue
            count = f" ({n} of the last {self.steps} steps)" if self.steps > 1 else ""
            again = (f"; repeated at most every {self.repeat_windows} log lines while it lasts"
                     if kind in self.quiet_until else "")
            out.append(f"{text}{count}{again}")
            self.quiet_until[kind] = self.windows + self.repeat_windows
        for kind in list(self.quiet_until):
            if kind not in self.window:
                del self.quiet_until[kind]  # gone: report it at once if it comes back
        self.window, self.steps = {}, 0
        self.windows += 1
        return out
