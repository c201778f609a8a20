"""Training engines. `megatron` (the default) is `megamor.trainer.Trainer`: megatron's DDP,
distributed optimizer and pipeline schedules. `deepspeed` is `megamor.engines.deepspeed_engine`:
the same model, data, logging, tracking and checkpoints under DeepSpeed's ZeRO."""

from __future__ import annotations

from megamor.config import Config


def create_trainer(cfg: Config):
    """The trainer of `parallel.engine`."""
    if cfg.parallel.engine == "deepspeed":
        from megamor.engines.deepspeed_engine import DeepSpeedTrainer
        return DeepSpeedTrainer(cfg)
    from megamor.trainer import Trainer
    return Trainer(cfg)
