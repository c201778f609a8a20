"""A checkpoint as one single-process model (any saved layout), for inference-side tools:
depth maps now, Hugging Face export and evaluation later."""

from __future__ import annotations

from pathlib import Path

import torch

from megamor.checkpoint import (CheckpointError, check_compatible, full_problem, read_meta,
                                resolve_resume)


def build_single_process_model(cfg, vocab_size: int, *, seed: int | None = None,
                               dtype: torch.dtype = torch.float32, fp8: bool = False,
                               local_backend: bool = True):
    """The single-process model recipe, used by inference, export, tests and benchmarks:
    -> (one-stage megatron model of `cfg` at TP = PP = DP = 1, its padded vocabulary).

    Installs the CPU shims, starts a world of one process unless one is running, seeds megatron's
    RNG streams and builds the stage with `seed` (default `train.seed`), the vocabulary padded to
    `model.make_vocab_size_divisible_by`. `local_backend` (default): the local (torch) layer spec,
    whose parameter names the Hugging Face conversions map and into which checkpoints load
    whatever backend saved them; False keeps `model.backend`. `dtype`/`fp8`: the
    TransformerConfig's precision (an FP8 run's config changes what runs around the layers)."""
    import copy

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megamor import parallel
    from megamor.model import build_stage, padded_vocab_size, transformer_config
    from megamor.shims import install_cpu_shims, seed_model_parallel_rng

    seed = cfg.train.seed if seed is None else seed
    one = copy.deepcopy(cfg)
    p = one.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.data_parallel_size = 1
    p.pipeline_layers, p.sequence_parallel, p.virtual_pipeline_size = None, False, 1
    if local_backend:
        one.model.backend = "local"
    install_cpu_shims()
    if not (parallel_state.model_parallel_is_initialized() and dist.get_world_size() == 1):
        parallel.initialize(1, 1, torch.device("cpu"))
    seed_model_parallel_rng(seed, 0)
    vocab = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    return build_stage(one, transformer_config(one, dtype, fp8=fp8), vocab, 0, seed), vocab


def load_for_inference(path: str | Path):
    """-> (model in eval mode, resolved config, tokenizer). Runs in a world of one process."""
    from megatron.core import dist_checkpointing

    from megamor.config import load_config
    from megamor.tokenizer import load_tokenizer

    ckpt = resolve_resume(str(path), Path(path))
    meta = read_meta(ckpt)
    cfg = load_config(ckpt / "config.yaml", [
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        "parallel.data_parallel_size=1", "parallel.pipeline_layers=null",
        "parallel.virtual_pipeline_size=1",
        # whichever engine trained it: the weights are megatron shards, read in one process
        "parallel.engine=megatron", "parallel.offload_optimizer=none",
        "parallel.offload_params=none", "parallel.deepspeed_config=null"])
    check_compatible(meta, cfg, None, None, path=ckpt)
    problem = full_problem(ckpt)  # every file's checksum (sizes only for older checkpoints)
    if problem is not None:
        raise CheckpointError(problem)
    tok = load_tokenizer(ckpt / "tokenizer")
    check_compatible(meta, cfg, tok, None, path=ckpt, inference=True)
    model, _ = build_single_process_model(cfg, cfg.model.vocab_size or tok.vocab_size)
    try:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt))
    except Exception as e:
        raise CheckpointError(f"{ckpt}: cannot load the model: {type(e).__name__}: {e}") from e
    loaded.pop("optimizer", None)  # common (non-sharded) optimizer state comes back too
    model.load_state_dict(loaded, strict=True)
    model.eval()
    return model, cfg, tok


def routing_depths(model, token_ids: list[int]) -> list[int]:
    """Recursion depth each token reaches under the model's routing: inference (threshold) in
    eval mode, training top-k under `megamor.evaluate.routing_mode(model, "topk")`."""
    if model.mcfg.arch != "mor":
        n = model.mcfg.num_recursions if model.mcfg.arch == "recursive" else 0
        return [n] * len(token_ids)
    model.trace_routing, model.routing_trace = True, {}
    with torch.no_grad():
        model(input_ids=torch.tensor([token_ids]))
    model.trace_routing = False
    return depths_from_trace({r: m[:, 0] for r, m in model.routing_trace.items()}, model.rcfg.type)


def depths_from_trace(trace: dict, router_type: str) -> list[int]:
    """Per-token depth of one sequence from a routing trace (step -> [s] active mask for
    expert-choice, or {1: [s] depths} for token-choice; tensors or lists)."""
    from megamor.depth_map import depth_per_token

    if router_type == "token_choice":
        return depth_per_token(depths=[round(float(d)) for d in trace[1]])
    return depth_per_token(step_masks=[[float(a) > 0.5 for a in trace[r]] for r in sorted(trace)])
