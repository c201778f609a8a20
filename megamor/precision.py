"""Numeric precision of a run: the dtype it computes in, and what wraps a stage in bf16.

    fp32   the stage as built; torch AdamW on the parameters themselves
    bf16   megatron's `Float16Module` around the stage (parameters and activations in bf16; the
           first stage casts its inputs, the last casts the loss back to fp32), megatron's DDP
           with fp32 main gradients (`grad_reduce_in_fp32`), megatron's optimizer (distributed or
           not) keeping fp32 main weights and Adam state: the program of a GPU run
    fp8    bf16 as above, with Transformer Engine's FP8 GEMMs inside the layers

Routers stay fp32 inside the bf16 model (`wrap_for_precision`): their parameters, their
buffers (loss-free balancing's token loads and bias) and their scores. `Float16Module` casts
every floating tensor of the stage with `module.bfloat16()`, which would make the token loads
exact only up to 256 and freeze the loss-free bias once |bias| >= 0.5 (bf16 spacing there is
0.004, four times the update rate 1e-3), and would rank bf16 scores with many exact ties at the
top-k boundary. megatron's MoE router computes its logits in fp32 for the same reasons
(`moe_router_dtype`, `_maintain_float32_expert_bias`); megamor's routers also keep their (tiny)
weights fp32, and cast only the gate to the activations' dtype where it scales them.

bf16 on a CPU is refused (`train.precision=bf16 needs a CUDA GPU`) unless `MEGAMOR_CPU_BF16=1`:
torch runs bf16 matmuls on the CPU, so the suite (and anyone testing) can run the GPU program,
wrappers and all, less the CUDA kernels; it is slow and never what a CPU user wants.
"""

from __future__ import annotations

import os

import torch

CPU_BF16_ENV = "MEGAMOR_CPU_BF16"


def cpu_bf16_opted_in() -> bool:
    return os.environ.get(CPU_BF16_ENV) == "1"


def resolve_precision(cfg, device: torch.device) -> tuple[torch.dtype, bool]:
    """(parameter dtype, FP8 on) for `train.precision` on `device`; a clear error for what
    cannot run there."""
    p = cfg.train.precision
    if p in ("bf16", "fp8") and device.type != "cuda" and not (p == "bf16" and cpu_bf16_opted_in()):
        raise RuntimeError(f"train.precision={p} needs a CUDA GPU; on CPU use fp32 (or auto)")
    if p == "fp8":
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            raise RuntimeError("train.precision=fp8 needs Transformer Engine (pip install "
                               "'megamor[gpu]'; see docs/cluster.md)") from None
        if cfg.model.backend == "local":
            raise RuntimeError("train.precision=fp8 needs model.backend=te (or auto)")
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return (torch.bfloat16 if p in ("bf16", "fp8") else torch.float32), p == "fp8"


def fp32_modules(stage: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules that keep fp32 state in a bf16 model: those flagged `keeps_fp32` (the
    routers) and everything inside them."""
    out: dict[int, torch.nn.Module] = {}
    for m in stage.modules():
        if getattr(m, "keeps_fp32", False):
            out.update((id(s), s) for s in m.modules())
    return list(out.values())


def wrap_for_precision(config, stage: torch.nn.Module) -> torch.nn.Module:
    """`stage` as the run computes with it: itself in fp32; in bf16 megatron's Float16Module
    around it, with the fp32 modules' parameters and buffers restored to their fp32 values
    (the same tensors: the parameters keep their identity, and with it their attributes)."""
    if not (config.bf16 or config.fp16):
        return stage
    if hasattr(stage, "wrap_chunks"):  # a VirtualStage: each chunk as megatron's schedule calls it
        stage.wrap_chunks(lambda chunk: wrap_for_precision(config, chunk))
        return stage
    from megatron.core.transformer.module import Float16Module

    kept = [(m, {n: p.data for n, p in m.named_parameters(recurse=False)},
             {n: b for n, b in m.named_buffers(recurse=False)})
            for m in fp32_modules(stage)]
    wrapped = Float16Module(config, stage)
    for m, params, buffers in kept:
        for n, data in params.items():
            m._parameters[n].data = data.float()
        for n, b in buffers.items():
            m._buffers[n] = b.float() if b.is_floating_point() else b
    return wrapped
