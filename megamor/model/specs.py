"""Layer specs: megatron-core's Llama-style layer (RMSNorm, RoPE, GQA, SwiGLU, no bias) with the
local (torch) or Transformer Engine providers, plus MoR's attention for recursive KV sharing.

The layer is megatron's `TransformerLayer` built from a `ModuleSpec`; MoR changes only the
self-attention slot (to `MoRSelfAttention` when KV sharing is on) and the mask type (routed
steps attend among an arbitrary subset of tokens, so masks are always explicit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclass
class KVShareContext:
    """Set on every `MoRSelfAttention` of a stage for one forward pass.

    mode 'write' (recursion step 1) stores this layer's pre-RoPE K/V under its slot; mode 'read'
    (later steps) replaces the K/V computed from the step's active tokens by step 1's K/V of all
    tokens, so queries of the surviving tokens really attend to the first step's keys/values.
    """

    mode: str = "off"  # off | write | read
    slot: int = 0
    store: dict = field(default_factory=dict)


class MoRSelfAttention(SelfAttention):
    """megatron SelfAttention whose K/V can come from recursion step 1 (recursive KV sharing)."""

    kv_share: Optional[KVShareContext] = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate: bool = False, split_qkv: bool = True):
        out = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv)
        ctx = self.kv_share
        if ctx is None or ctx.mode == "off":
            return out
        query, key, value = out[0], out[1], out[2]
        if ctx.mode == "write":
            ctx.store[ctx.slot] = (key, value)
        else:
            key, value = ctx.store[ctx.slot]
        return (query, key, value) + tuple(out[3:])


def _te_layer_spec() -> ModuleSpec:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    except ImportError as e:
        raise RuntimeError(
            "model.backend=te needs Transformer Engine (pip install 'megamor[gpu]' on a CUDA "
            f"machine, see docs/cluster.md); import failed: {e}"
        ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("model.backend=te needs a CUDA GPU; none is visible (use backend=local)")
    return get_gpt_layer_with_transformer_engine_spec()


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


def layer_spec(backend: str, kv_sharing: bool, routed: bool) -> ModuleSpec:
    """The spec of one transformer layer of the shared block (and of prelude/coda layers)."""
    spec = _te_layer_spec() if backend == "te" else get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {})
    attn.params["attn_mask_type"] = AttnMaskType.arbitrary if (routed or kv_sharing) else AttnMaskType.causal
    if kv_sharing:
        attn.module = MoRSelfAttention
    return spec


def norm_spec(backend: str) -> ModuleSpec:
    """Final RMSNorm: the same provider as the layers' input norm."""
    return copy.deepcopy(layer_spec(backend, False, False).submodules.input_layernorm)
