"""The DeepSpeed engine's configuration (megamor/engines/deepspeed.py): DeepSpeed's config
generated from megamor's (`deepspeed_config`, one source of truth; a `parallel.deepspeed_config`
JSON may override keys, and every overridden key is logged), megatron's weight-decay parameter
groups, megatron's parallel state as DeepSpeed's `mpu`, and the safe loader of DeepSpeed's
checkpoint files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from megamor.checkpoint_meta import CheckpointError
from megamor.config import Config, ConfigError


# ----------------------------------------------------------------------------- configuration


def optimizer_section(cfg: Config, device_type: str) -> dict:
    """AdamW with megamor's hyper-parameters. Which implementation DeepSpeed builds:
    - on the CPU, and on GPUs without offload: torch's AdamW (`torch_adam`), as the megatron
      engine uses when apex is absent; no JIT-compiled extension is needed;
    - optimizer offload on GPUs: DeepSpeed's CPUAdam (DeepSpeed requires its own CPU optimizer
      there; it compiles the cpu_adam extension on first use).
    The learning rate and weight decay set here are overwritten per group, every step, by the
    LR schedule (`OptimizerParamScheduler`)."""
    t, p = cfg.train, cfg.parallel
    params = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
              "weight_decay": t.weight_decay}
    offload_on_gpu = p.offload_optimizer != "none" and device_type == "cuda"
    if not offload_on_gpu:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def deepspeed_config(cfg: Config, dp: int, num_microbatches: int, device_type: str,
                     bf16: bool) -> dict:
    """DeepSpeed's config from megamor's: batch, accumulation, clipping, precision, ZeRO stage and
    offload. `dp`: data-parallel size; DeepSpeed checks micro x accumulation x dp = global."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": p.offload_optimizer, "pin_memory": device_type == "cuda"}
    if p.offload_params != "none":
        zero["offload_param"] = {"device": p.offload_params, "pin_memory": device_type == "cuda"}
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": t.clip_grad,
        "optimizer": optimizer_section(cfg, device_type),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # megamor prints its own line
        "wall_clock_breakdown": False,
    }
    if p.offload_optimizer != "none" and device_type != "cuda":
        # On a CPU-only machine the "offloaded" optimizer is torch's AdamW, already on the CPU.
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def apply_overrides(generated: dict, path: Optional[str]) -> tuple[dict, list[str]]:
    """`parallel.deepspeed_config`: a JSON file whose keys replace the generated ones (nested
    sections merged key by key). Returns the config and one line per overridden key."""
    if path is None:
        return generated, []
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config={path}: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={path}: the top level must be an object")
    lines: list[str] = []

    def merge(base: dict, new: dict, prefix: str) -> dict:
        out = dict(base)
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                out[k] = merge(base[k], v, f"{prefix}{k}.")
            else:
                if base.get(k, object()) != v:
                    lines.append(f"{prefix}{k}: {base.get(k, '(unset)')!r} -> {v!r}")
                out[k] = v
        return out

    return merge(generated, user, ""), lines


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """megatron's weight-decay groups: no decay for biases and 1-D parameters (norms), decay for
    the rest; `wd_mult` / `max_lr` / `min_lr` as megatron's OptimizerParamScheduler reads them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) == 1 or name.endswith(".bias") else decay).append(p)
    t = cfg.train
    base = {"lr_mult": 1.0, "max_lr": t.lr, "min_lr": t.min_lr}
    return [g for g in ({"params": decay, "wd_mult": 1.0, **base},
                        {"params": no_decay, "wd_mult": 0.0, **base}) if g["params"]]


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron's parallel state: tensor parallel is DeepSpeed's
    model parallel; ZeRO shards over megatron's data-parallel group."""

    def __init__(self):
        from megatron.core import parallel_state as mps
        self.mps = mps

    def get_model_parallel_rank(self):
        return self.mps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.mps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.mps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.mps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.mps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.mps.get_data_parallel_group()


def load_engine_file(path: str, map_location=None):
    """One file of DeepSpeed's engine state, without unpickling arbitrary objects: torch's
    `weights_only` loader, allowing only the three plain DeepSpeed classes its ZeRO files hold
    (the ZeRO stage enum, the loss-scaler record, fragment addresses). Replaces DeepSpeed's own
    loader, which unpickles everything."""
    import pickle
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not loaded: it holds objects other than tensors and "
                              f"DeepSpeed's plain state records ({first[:200]})") from None


def prepare_deepspeed(device: torch.device) -> None:
    """DeepSpeed's INFO logging off (megamor prints its own lines). On the CPU, DeepSpeed's
    shared-memory all-reduce kernel is not built: it serves only DeepSpeed's inference
    all-reduce, and its JIT build would need a C++ compiler on every machine that trains."""
    # Named, not detected: DeepSpeed's detection prints a warning on every CPU rank.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    import deepspeed.ops
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
