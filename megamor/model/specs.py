"""The spec tree of a MoR stage: where the model's parts are named and their providers chosen.

    ModuleSpec(MoRModel, submodules=MoRStageSubmodules(
        layer=ModuleSpec(TransformerLayer, ...)       every unrolled layer: prelude, the shared
            self_attention=ModuleSpec(MoRSelfAttention, ...)   recursion block, coda
                linear_qkv, core_attention, linear_proj
            mlp=ModuleSpec(MLP, linear_fc1, linear_fc2)
        router=ModuleSpec(ExpertChoiceRouter | TokenChoiceRouter) | IdentityOp
        final_layernorm=<the backend's RMSNorm>))

The layer is megatron's Llama-style `TransformerLayer` (RMSNorm, RoPE, GQA, SwiGLU, no bias),
composed from a megatron `BackendSpecProvider` exactly as megatron's own GPT specs are, so the
local (torch) and Transformer Engine backends build the same tree from different providers:

    slot                      local                         te
    input / pre-MLP norm      TorchRMSNorm                  IdentityOp (fused into the linear)
    linear_qkv / linear_fc1   ColumnParallelLinear          TELayerNormColumnParallelLinear
    core_attention            SDPAttention (torch SDPA)     TEDotProductAttention
    final_layernorm           TorchRMSNorm                  TENorm

`TorchRMSNorm` is megatron's `WrappedTorchNorm` (torch's RMSNorm) that also runs under sequence
parallelism, which megatron's refuses: on a sequence slice a norm is the same computation, its
weight only has to be flagged `sequence_parallel` so that its gradient is summed over tensor
parallel (what TE's and apex's norms do; megatron's finalize_model_grads sums flagged weights).

The final norm comes from the provider, never from a layer's `input_layernorm` slot (which is
`IdentityOp` under TE). Checkpoint keys are the same for both (megatron's key map below).
What runs around each layer (FP8 context, recompute) is in `MoRModel._run` and
`megamor/model/fp8.py`.
"""

from __future__ import annotations

from typing import Union

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megamor.model.attention import MoRSelfAttention, SDPAttention
from megamor.model.mor_model import MoRModel, MoRStageSubmodules

BACKENDS = ("local", "te")


def check_te_available() -> None:
    """Transformer Engine and a GPU, or an error that says what is missing."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "model.backend=te needs Transformer Engine (pip install 'megamor[gpu]' on a CUDA "
            f"machine, see docs/cluster.md); import failed: {e}") from None
    if not torch.cuda.is_available():
        raise RuntimeError("model.backend=te needs a CUDA GPU; none is visible (use backend=local)")


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401
            return "te"
        except ImportError:
            return "local"
    return "local"


class TorchRMSNorm:
    """torch's RMSNorm as megatron's `WrappedTorchNorm` builds it, and under sequence
    parallelism too, with its weight flagged `sequence_parallel` (module docstring)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        setattr(norm.weight, "sequence_parallel", True)
        return norm


class LocalProvider(LocalSpecProvider):
    """megatron's local provider, its RMSNorm `TorchRMSNorm`."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return TorchRMSNorm if rms_norm else super().layer_norm(rms_norm, for_qk)


def provider(backend: str):
    """megatron's spec provider for a backend (the local one with `TorchRMSNorm`). The TE
    provider only names TE classes, so the TE tree can be built (not instantiated) and pinned
    by CPU tests."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        return TESpecProvider()
    if backend == "local":
        return LocalProvider()
    raise ValueError(f"model.backend={backend!r}: expected one of {BACKENDS} (or auto)")


def layer_spec(backend: str) -> ModuleSpec:
    """One unrolled layer (prelude, shared block or coda)."""
    p = provider(backend)
    fused = p.fuse_layernorm_and_linear()  # TE: the input norm lives inside the next linear
    norm = IdentityOp if fused else p.layer_norm(rms_norm=True)
    col = p.column_parallel_layer_norm_linear() if fused else p.column_parallel_linear()
    core = p.core_attention() if backend == "te" else SDPAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=MoRSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},  # per call: AttentionCall
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=core, linear_proj=p.row_parallel_linear(),
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=col, linear_fc2=p.row_parallel_linear())),
            mlp_bda=get_bias_dropout_add,
            # Local norms are saved under TE's fused names: one checkpoint format for both.
            sharded_state_dict_keys_map=({} if fused else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
        ),
    )


def router_spec(model_cfg, routing_cfg) -> Union[ModuleSpec, type]:
    from megamor.model.routing import ExpertChoiceRouter, TokenChoiceRouter

    if model_cfg.arch != "mor":
        return IdentityOp
    alpha = routing_cfg.resolved_alpha()
    if routing_cfg.type == "expert_choice":
        return ModuleSpec(module=ExpertChoiceRouter, params={
            "alpha": alpha, "init_std": model_cfg.init_std,
            "aux_router": routing_cfg.causal == "aux_router"})
    return ModuleSpec(module=TokenChoiceRouter, params={
        "num_recursions": model_cfg.num_recursions, "alpha": alpha, "init_std": model_cfg.init_std})


def stage_spec(backend: str, model_cfg, routing_cfg) -> ModuleSpec:
    """The whole tree of one stage (see the module docstring)."""
    return ModuleSpec(module=MoRModel, submodules=MoRStageSubmodules(
        layer=layer_spec(backend),
        router=router_spec(model_cfg, routing_cfg),
        final_layernorm=provider(backend).layer_norm(rms_norm=True)))


def spec_for_run(backend: str, model_cfg, routing_cfg) -> ModuleSpec:
    """`stage_spec` after checking that the backend can run here."""
    if backend == "te":
        check_te_available()
    return stage_spec(backend, model_cfg, routing_cfg)
