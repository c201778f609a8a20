"""What rank 0 tells the operator: a start-up banner, a line per checkpoint saved, a final
summary; and megatron's log noise that is expected here, filtered out.

    megamor: mor model (expert_choice routing, 3 recursions, 8 unrolled layers): 250.62K ...
    megamor: layout tp1 x pp1 x dp2 = 2 rank(s) (cpu, fp32)
    megamor: data /data/x (12,345 samples = 790,080 tokens); 512 tokens per step (8 x 64), ...
    megamor: output runs/default (checkpoints runs/default/checkpoints); mlflow sqlite:///...
    megamor: checkpoint step 100 saved: runs/default/checkpoints/step_00000100 (1.2 s)
    megamor: finished steps 1-300 in 1m02s; final loss 3.8312; checkpoint runs/.../step_00000300
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch loads with the first function that needs it (`megamor --help` loads none)
    import torch


def parameter_count(stage: torch.nn.Module, device: torch.device) -> int:
    """Parameters of the whole model, every rank taking part (one all-reduce over the model-
    parallel group, on the training `device`): each tensor-parallel shard once, weights
    replicated over tensor parallel once, copies of shared layers (flagged `shared`) not again."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    # ds_numel: a ZeRO-3-partitioned parameter's full size (its local tensor is empty)
    local = sum(getattr(p, "ds_numel", p.numel()) for p in stage.parameters()
                if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p))
    total = torch.tensor([float(local)], dtype=torch.float64, device=device)
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")


def banner(cfg, dims, device: torch.device, precision: str, params: int, data_desc: str,
           data_samples: int, first_step: int, mlflow: str) -> list[str]:
    m, r, t = cfg.model, cfg.routing, cfg.train
    kind = f"{m.arch} model"
    if m.arch == "mor":
        kind += (f" ({r.type} routing, {m.num_recursions} recursions, {m.num_layers} unrolled "
                 f"layers)")
    elif m.arch == "recursive":
        kind += f" ({m.num_recursions} recursions, {m.num_layers} unrolled layers)"
    else:
        kind += f" ({m.num_layers} layers)"
    per_step = t.global_batch_size * m.seq_length
    from megamor.preflight import checkpoint_root
    p = cfg.parallel
    engine = "megatron" + (" distributed optimizer" if p.use_distributed_optimizer else "")
    if p.engine == "deepspeed":
        offload = [k for k, v in (("optimizer", p.offload_optimizer), ("params", p.offload_params))
                   if v != "none"]
        engine = f"deepspeed ZeRO-{p.zero_stage}" + (f", {' + '.join(offload)} offloaded to the "
                                                     f"CPU" if offload else "")
    return [
        f"megamor: {kind}: {human(params)} parameters ({params:,})",
        f"megamor: layout tp{dims.tp} x pp{dims.pp}"
        + (f" (x vp{p.virtual_pipeline_size}, interleaved)" if p.virtual_pipeline_size > 1 else "")
        + f" x dp{dims.dp} = {dims.world_size} rank(s) "
        f"({device.type}, {precision}; engine {engine})",
        f"megamor: data {data_desc} ({data_samples:,} samples = {data_samples * m.seq_length:,} "
        f"tokens); {per_step:,} tokens per step ({t.global_batch_size} x {m.seq_length}), "
        f"steps {first_step}-{t.train_steps}",
        f"megamor: output {cfg.run.output_dir} (checkpoints {checkpoint_root(cfg)}); "
        f"mlflow {mlflow}",
    ]


def mlflow_location(cfg, out) -> str:
    import os
    from megamor.tracking import default_tracking_uri
    if not cfg.tracking.enabled:
        return "off (tracking.enabled=false)"
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") \
        or default_tracking_uri(out)


# megatron's check before each save compares every rank's "common" state with rank 0's; the
# distributed optimizer's fully reshardable format keeps its per-rank `param_state` there by
# design, so this one difference is expected on every save. Anything else still gets through.
_EXPECTED_COMMON_DIFF = re.compile(
    r"common state dict differs from rank 0 common state dict\. Keys only on rank 0: \[\], "
    r"Keys only on \d+: \[\('optimizer', 'param_state'\)\], Mismatched keys: \[\]$")


class _ExpectedNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _EXPECTED_COMMON_DIFF.search(record.getMessage())


def silence_expected_megatron_noise() -> None:
    log = logging.getLogger("megatron.core.dist_checkpointing.validation")
    if not any(isinstance(f, _ExpectedNoise) for f in log.filters):
        log.addFilter(_ExpectedNoise())


# Notices that libraries print on every run of a megamor command and that say nothing to its
# user: a CPU machine has no CUDA runtime; megatron-core 0.19's migration and deprecation notices
# about how megamor calls it (spec wrapping, DDP layout computed inside DDP, its own async save);
# torch's notes that a checkpoint is read in one process, which is what megamor asks for there;
# MLflow's notes that it creates a run's local database.
_LIBRARY_NOTICES = {
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
    "megatron.core.transformer.transformer_layer": r"Rewrapping ModuleSpec with module",
    "megatron.core.distributed.distributed_data_parallel": r"full_param_layout not provided",
    "megatron.core.dist_checkpointing.strategies.torch": r"MCore's async save is deprecated",
}
_TORCH_WARNINGS = (r"torch\.distributed is disabled, unavailable or uninitialized",
                   r"The argument order of load has been changed")


class _Notice(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_notices() -> None:
    """Filter `_LIBRARY_NOTICES` and `_TORCH_WARNINGS` (each by its logger and message: anything
    else those loggers say still gets through). Called before torch or megatron is imported by
    every entry point (the CLI, `megamor.pretrain.run`): torch logs its CUDA notice at import."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # creating its tables
    for name, pattern in _LIBRARY_NOTICES.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Notice) for f in log.filters):
            log.addFilter(_Notice(pattern))
    for message in _TORCH_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    silence_expected_megatron_noise()


def checkpoint_line(step: int, path, seconds: Optional[float]) -> str:
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    return f"megamor: checkpoint step {step} saved: {path}{took}"


def summary_line(first_step: int, last_step: int, seconds: float, loss: Optional[float],
            checkpoint, out) -> str:
    loss_text = f"final loss {loss:.4f}" if loss is not None else "no step trained"
    return (f"megamor: finished steps {first_step}-{last_step} in {duration(seconds)}; "
            f"{loss_text}; checkpoint {checkpoint}; metrics {out}/metrics.jsonl")
