"""A Transformer Engine stand-in for CPU tests: what megamor asks of TE, recorded.

Transformer Engine cannot be installed here (nor on the lent GPU machine: no binary torch
binding). The stand-in replaces, for one test (`install(monkeypatch)`):

- megatron's `fp8_utils.get_fp8_context`: a recording FP8 context. Like megatron's, it is a
  null context for the bf16 edge layers (`train.fp8_bf16_layers`); like TE's `fp8_autocast`,
  it runs a global amax reduction when an outermost context exits under delayed scaling
  (counted in `amax_reductions`).
- the TE spec provider: megatron's local column / row parallel linears with TE's bookkeeping
  as megatron's TE wrappers drive it: an `is_first_microbatch` flag (set by the schedule's
  `set_is_first_microbatch`, consumed by the module's first call), and an FP8 weight cast that
  such a call refreshes and later calls reuse. Each call is recorded (`Call`): its flag, whether
  it ran inside FP8, whether it refreshed the cast, whether the cast it used is stale (not the
  current weights), whether it was a recompute. An FP8 call whose GEMM rows are not a multiple
  of 16 fails as TE's shape assertion does.
- megatron's `te_checkpoint`: megatron's CPU checkpoint, recording each call, with TE's
  behaviour of restoring the forward's FP8 state on the recompute.
- megamor's TE availability check and (for trainer tests) the refusal of FP8 on a CPU.

The arithmetic stays megatron's local layers' (bf16 / fp32): the stand-in pins bookkeeping, not
FP8 numerics.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import fp8_utils, tensor_parallel
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megamor.model.attention import SDPAttention


@dataclass
class Call:
    module: str  # name inside the stage, e.g. "layers.1.mlp.linear_fc1"
    first_microbatch: Optional[bool]  # the flag TE was given
    fp8: bool  # inside an FP8 context
    refreshed: bool  # the FP8 weight cast was (re)made by this call
    stale: bool  # an FP8 call that used a cast of other weights than the current ones
    recompute: bool  # run again by activation recompute (backward)
    rows: int


class Recorder:
    """What the stand-in saw; `step()` marks a new training step in the record."""

    def __init__(self):
        self.calls: list[Call] = []
        self.contexts: list[int] = []  # layer numbers of the FP8 contexts entered
        self.checkpoints = 0  # te_checkpoint calls
        self.amax_reductions = 0
        self.depth = 0
        self.recomputing = False
        self.recipe: Optional[str] = None

    @property
    def in_fp8(self) -> bool:
        return self.depth > 0

    def clear(self) -> None:
        self.calls.clear()
        self.contexts.clear()
        self.checkpoints = self.amax_reductions = 0

    # megatron's get_fp8_context, recorded
    def get_fp8_context(self, config, layer_no: int = -1, is_init: bool = False):
        assert config.fp8 and not is_init
        if fp8_utils.is_first_last_bf16_layer(config, layer_no):
            return contextlib.nullcontext()
        self.recipe = str(getattr(config.fp8_recipe, "value", config.fp8_recipe))
        return self._context(layer_no)

    @contextlib.contextmanager
    def _context(self, layer_no: int, restored: bool = False):
        if not restored:
            self.contexts.append(layer_no)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and not restored and self.recipe == "delayed":
                self.amax_reductions += 1  # TE: reduce amax histories at the outermost exit

    # megatron's te_checkpoint (TE's checkpoint): CPU recompute, FP8 state of the forward restored
    def te_checkpoint(self, fn, distribute, rng_tracker, tp_group, *args):
        self.checkpoints += 1
        in_fp8, runs = self.in_fp8, [0]

        def run(*a):
            runs[0] += 1
            if runs[0] == 1:
                return fn(*a)
            self.recomputing = True
            try:
                with (self._context(-1, restored=True) if in_fp8 else contextlib.nullcontext()):
                    return fn(*a)
            finally:
                self.recomputing = False
        return tensor_parallel.checkpoint(run, distribute, *args)


REC: Optional[Recorder] = None


class _TEBookkeeping:
    """What megatron's TE linear wrappers (TELinear & co.) do around TE's forward."""

    standin_name = "?"

    def _init_te(self):
        self.is_first_microbatch = True
        self._fp8_weight = None

    def forward(self, x, *args, **kwargs):
        flag = self.is_first_microbatch
        rec = REC
        refreshed = stale = False
        rows = x.shape[0] * (x.shape[1] if x.dim() > 2 else 1)
        if rec is not None and rec.in_fp8:
            assert rows % 16 == 0, (f"{self.standin_name}: FP8 execution requires the GEMM's "
                                    f"row count to be divisible by 16, got {rows} (TE's assertion)")
            w = self.weight.detach()
            if flag is None or flag or self._fp8_weight is None:
                self._fp8_weight = w.clone()
                refreshed = True
            stale = not torch.equal(self._fp8_weight, w)
        if rec is not None:
            rec.calls.append(Call(self.standin_name, flag, rec.in_fp8, refreshed, stale,
                                  rec.recomputing, rows))
        self.is_first_microbatch = False
        return super().forward(x, *args, **kwargs)


class StandInColumnParallelLinear(_TEBookkeeping, ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_te()


class StandInRowParallelLinear(_TEBookkeeping, RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_te()


class StandInTESpecProvider(LocalSpecProvider):
    def column_parallel_linear(self):
        return StandInColumnParallelLinear

    def row_parallel_linear(self):
        return StandInRowParallelLinear

    def core_attention(self):
        return SDPAttention


def name_linears(model: torch.nn.Module) -> None:
    """Give the stand-in linears of a built stage their names (for the records)."""
    for name, m in model.named_modules():
        if isinstance(m, _TEBookkeeping):
            m.standin_name = name


def install(monkeypatch) -> Recorder:
    """The stand-in for the rest of one test (monkeypatch undoes it)."""
    from megatron.core.extensions import transformer_engine as mte

    import megamor.model.specs as specs
    import megamor.training.loop as loop

    rec = Recorder()
    monkeypatch.setattr(fp8_utils, "get_fp8_context", rec.get_fp8_context)
    monkeypatch.setattr(mte, "te_checkpoint", rec.te_checkpoint)
    real_provider = specs.provider
    monkeypatch.setattr(specs, "provider",
                        lambda b: StandInTESpecProvider() if b == "te" else real_provider(b))
    monkeypatch.setattr(specs, "check_te_available", lambda: None)
    real_precision = loop.resolve_precision

    def precision(cfg, device):
        if cfg.train.precision == "fp8":
            return torch.bfloat16, True
        return real_precision(cfg, device)
    monkeypatch.setattr(loop, "resolve_precision", precision)
    monkeypatch.setattr(sys.modules[__name__], "REC", rec)  # None again after the test
    return rec
