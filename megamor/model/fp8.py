"""FP8 bookkeeping around the layer calls of a stage, as megatron's TransformerBlock keeps it, and
what the shared recursion block adds to it.

- Contexts. Current-scaling recipes (tensorwise, mxfp8, blockwise) open one FP8 context per
  layer call, so that the first / last `train.fp8_bf16_layers` unrolled layers can stay outside
  it. Delayed scaling opens one context around all of a forward's layers: TE reduces the amax
  history over the amax group each time an outermost FP8 context exits, so a context per layer
  would run that global reduction after every layer call (megatron: `use_outer_quantization_
  context` for delayed scaling only; megamor's config refuses bf16 edge layers with delayed).
- FP8 weight casts. megatron's TE linears pass `is_first_microbatch` to TE once per training
  step: the schedule sets it on every module at the first micro-batch
  (`set_is_first_microbatch`), the module's first call consumes it (TE then casts the current
  weights to FP8 and caches the casts) and later calls reuse the cache. A shared layer runs
  several times per micro-batch, and when its first call of the step is one of the bf16 edge
  layers (sharing `cycle` / `sequence` with `train.fp8_bf16_layers` >= 1, `middle_*` with >= 2),
  that call runs outside FP8 and would consume the flag: every later FP8 call would then reuse
  the casts made at the first step of training, for ever. A call outside FP8 therefore leaves
  the flags as it found them (`keep_first_microbatch_flags`), and the layer's first FP8 call of
  the step refreshes the casts.
"""

from __future__ import annotations

import contextlib

from megatron.core import fp8_utils


def _recipe(config) -> str:
    r = config.fp8_recipe
    return str(getattr(r, "value", r))


def delayed_scaling(config) -> bool:
    return bool(config.fp8) and _recipe(config) == "delayed"


def runs_in_fp8(config, layer_index: int) -> bool:
    """Whether unrolled layer `layer_index` (global) computes in FP8."""
    return bool(config.fp8) and not fp8_utils.is_first_last_bf16_layer(config, layer_index)


@contextlib.contextmanager
def keep_first_microbatch_flags(module):
    """Run a call that does not consume TE's per-step `is_first_microbatch` flags of
    `module`'s linears (they are restored afterwards)."""
    mods = getattr(module, "_first_microbatch_modules", None)
    if mods is None:
        mods = [m for m in module.modules() if hasattr(m, "is_first_microbatch")]
        module._first_microbatch_modules = mods
    flags = [m.is_first_microbatch for m in mods]
    try:
        yield
    finally:
        for m, f in zip(mods, flags):
            m.is_first_microbatch = f


def forward_context(config):
    """Around all of a stage's layer calls in one forward: delayed scaling's one FP8 context."""
    if delayed_scaling(config):
        return fp8_utils.get_fp8_context(config)
    return contextlib.nullcontext()


def layer_context(config, layer_index: int, layer):
    """Around one call of `layer` as unrolled layer `layer_index`: its own FP8 context
    (current scaling), nothing (delayed scaling: the forward's context is open), or, for a
    bf16 edge layer of an FP8 run, no context and the layer's first-micro-batch flags kept."""
    if not config.fp8:
        return contextlib.nullcontext()
    if not runs_in_fp8(config, layer_index):
        return keep_first_microbatch_flags(layer)
    if delayed_scaling(config):
        return contextlib.nullcontext()
    return fp8_utils.get_fp8_context(config, layer_index)
