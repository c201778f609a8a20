"""Model construction: megatron TransformerConfig from the run config, and one stage's module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megamor.config import Config
from megamor.model.layout import Plan, build_plan, copy_index, stage_ranges
from megamor.model.mor_model import MoRModel
from megamor.model.specs import resolve_backend

__all__ = ["MoRModel", "build_plan", "build_stage", "padded_vocab_size", "plan_for", "transformer_config"]


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    m = multiple * tp
    return ((vocab_size + m - 1) // m) * m


def plan_for(cfg: Config) -> tuple[Plan, list[tuple[int, int]]]:
    m = cfg.model
    plan = build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))
    ranges = stage_ranges(plan, cfg.parallel.pipeline_model_parallel_size, cfg.parallel.pipeline_layers)
    return plan, ranges


def transformer_config(cfg: Config, dtype: torch.dtype, fp8: bool = False) -> TransformerConfig:
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
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        fp8="hybrid" if fp8 else None,
        # Every layout initialises from the same CPU draw (see mor_model.seeded).
        use_cpu_initialization=True,
        perform_initialization=True,
        # Fusions need CUDA kernels; routed steps need explicit masks and per-sequence RoPE.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        # Batched p2p pairs sends/receives wrongly when prev and next stage are one rank.
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        deallocate_pipeline_outputs=False,
    )


def build_stage(cfg: Config, tcfg: TransformerConfig, vocab_size: int, pp_rank: int,
                seed: int, dp_group=None) -> MoRModel:
    plan, ranges = plan_for(cfg)
    pp = cfg.parallel.pipeline_model_parallel_size
    return MoRModel(
        tcfg, cfg.model, cfg.routing, plan, ranges[pp_rank], vocab_size,
        pre_process=pp_rank == 0, post_process=pp_rank == pp - 1, seed=seed,
        backend=resolve_backend(cfg.model.backend), dp_group=dp_group,
        layer_copy_index=copy_index(plan, ranges, pp_rank))
