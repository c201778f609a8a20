"""Model construction: megatron TransformerConfig from the run config, and one stage's module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megamor.config import Config
from megamor.kernels import apex_wgrad_available, fusion_flags
from megamor.layout import Plan, build_plan, copy_index, stage_pieces
from megamor.model.mor_model import MoRModel
from megamor.model.virtual_stage import VirtualStage
from megamor.model.specs import resolve_backend, spec_for_run

__all__ = ["MoRModel", "VirtualStage", "build_plan", "build_stage", "padded_vocab_size", "plan_for", "transformer_config"]


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return ((vocab_size + m - 1) // m) * m


def plan_for(cfg: Config, vocab_size: int | None = None) -> tuple[Plan, list[list[tuple[int, int]]]]:
    """The unrolled plan and each pipeline stage's model chunks as [start, stop) ranges (one
    per stage, or `parallel.virtual_pipeline_size` interleaved ones: `layout.stage_pieces`).
    `vocab_size`: the padded vocabulary the output layer really has; it weighs the last stage
    in the cost-balanced cut."""
    from megamor.flops import LAYER_OVERHEAD, pipeline_costs

    m, p = cfg.model, cfg.parallel
    plan = build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))
    costs = None
    if p.pipeline_model_parallel_size > 1 and p.pipeline_layers is None:
        vocab = vocab_size or m.vocab_size
        if vocab is None:
            raise ValueError("the pipeline cut needs the vocabulary size: pass vocab_size or set "
                             "model.vocab_size")
        cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        costs = pipeline_costs(m, plan, m.seq_length, vocab, cfg.routing,
                               LAYER_OVERHEAD["cuda" if cuda else "cpu"])
    sizes = None if p.pipeline_layers is None else [int(x) for x in p.pipeline_layers]
    pieces = stage_pieces(plan, p.pipeline_model_parallel_size, p.virtual_pipeline_size, sizes,
                          costs)
    return plan, pieces


def transformer_config(cfg: Config, dtype: torch.dtype, fp8: bool = False,
                       device_type: str = "cpu") -> TransformerConfig:
    """`device_type`: where the model runs ("cuda" turns on the fused kernels that exist)."""
    m, p = cfg.model, cfg.parallel
    bf16 = dtype == torch.bfloat16
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=(p.virtual_pipeline_size
                                              if p.virtual_pipeline_size > 1 else None),
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        **fp8_settings(cfg, fp8),
        **recompute_settings(cfg),
        # Every layout initialises from the same CPU draw (see mor_model.seeded).
        use_cpu_initialization=True,
        perform_initialization=True,
        # Fused kernels where they exist (GPU; one needs apex): megamor/kernels.py.
        **fusion_flags(device_type, device_type == "cuda" and apex_wgrad_available(), bf16),
        # Batched p2p pairs sends/receives wrongly when prev and next stage are one rank.
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        deallocate_pipeline_outputs=False,
    )


def build_stage(cfg: Config, tcfg: TransformerConfig, vocab_size: int, pp_rank: int,
                seed: int, dp_group=None) -> MoRModel | VirtualStage:
    """One pipeline stage, built from its spec tree (megamor.model.specs): a MoRModel, or with
    `parallel.virtual_pipeline_size` > 1 a VirtualStage of MoRModel chunks that share the unique
    layers they both run (the stage holds each layer once)."""
    plan, pieces = plan_for(cfg, vocab_size)
    pp = cfg.parallel.pipeline_model_parallel_size
    mine = pieces[pp_rank]
    vp = len(mine)
    backend = resolve_backend(cfg.model.backend)
    spec = spec_for_run(backend, cfg.model, cfg.routing)
    copies = copy_index(plan, pieces, pp_rank)
    chunks, built = [], {}
    for v, rng in enumerate(mine):
        chunk = build_module(
            spec, config=tcfg, model_cfg=cfg.model, routing_cfg=cfg.routing, plan=plan,
            stage=rng, vocab_size=vocab_size, pre_process=pp_rank == 0 and v == 0,
            post_process=pp_rank == pp - 1 and v == vp - 1, seed=seed, dp_group=dp_group,
            layer_copy_index=copies, packed_sets=packed_token_sets(cfg.model.varlen_attention, backend),
            shared_layers=built, vp_stage=v if vp > 1 else None)
        built.update((int(u), layer) for u, layer in chunk.layers.items())
        chunks.append(chunk)
    return chunks[0] if vp == 1 else VirtualStage(chunks)


def packed_token_sets(varlen_attention: str, backend: str) -> bool:
    """Variable-length token sets (token-choice, threshold routing at eval) as THD-packed
    sequences (Transformer Engine's varlen flash / fused attention, no padding rows) or padded
    with causal attention (`auto`: packed under TE; padded on the local backend, where SDPA's
    fused causal kernel beats the block-diagonal mask a packed set needs there)."""
    if varlen_attention == "auto":
        return backend == "te"
    return varlen_attention == "packed"


def fp8_settings(cfg: Config, fp8: bool) -> dict:
    """TransformerConfig's FP8 fields from `train.fp8_*` (empty without FP8). The first and last
    `train.fp8_bf16_layers` unrolled layers stay in bf16 (megatron's get_fp8_context skips them);
    routers, embedding and output layer are plain torch / megatron-local modules that never run
    in FP8."""
    if not fp8:
        return {"fp8": None}
    t = cfg.train
    keep = t.fp8_bf16_layers
    return {
        "fp8": t.fp8_format, "fp8_recipe": t.fp8_recipe, "fp8_margin": t.fp8_margin,
        "fp8_amax_history_len": t.fp8_amax_history_len,
        "fp8_amax_compute_algo": t.fp8_amax_compute_algo,
        "first_last_layers_bf16": keep > 0,
        "num_layers_at_start_in_bf16": keep, "num_layers_at_end_in_bf16": keep,
    }


def recompute_settings(cfg: Config) -> dict:
    """`model.recompute=selective` is megatron's core-attention recompute (inside its
    SelfAttention); `full` is done by MoRModel._run per layer or per recursion step, so megatron
    is not asked for it."""
    if cfg.model.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}
