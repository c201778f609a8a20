"""Training engines, below the one training loop (megamor/training/loop.py), behind the interface
of `megamor.engines.base.Engine`: `megatron` (the default; megatron's DDP, distributed optimizer
and pipeline schedules, megamor/engines/megatron.py) and `deepspeed` (DeepSpeed's ZeRO-1/2/3,
megamor/engines/deepspeed.py). docs/engines.md compares them."""

from __future__ import annotations


def create_engine(ctx):
    """The engine of `parallel.engine`, not built yet (`Engine.build`)."""
    if ctx.cfg.parallel.engine == "deepspeed":
        from megamor.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(ctx)
    from megamor.engines.megatron import MegatronEngine
    return MegatronEngine(ctx)
