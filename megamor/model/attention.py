"""Attention for MoR layers: the self-attention slot and the local core-attention kernel.

`MoRSelfAttention` is megatron's `SelfAttention` with two per-call settings that a shared layer
needs, because the same module runs on full sequences, on gathered token sets and (with KV
sharing) against step 1's keys:

- the mask type of this call (`AttentionCall.mask_type`): `causal` with no mask tensor for
  full-length layers and for every gathered set (its tokens are in position order, padding rows at
  the end of each sequence, so plain causal attention is exact for the real tokens);
  `padding_causal` for packed (THD) token sets, `arbitrary` (explicit mask) only for KV-sharing
  reads, whose queries are a subset of the keys' positions;
- recursive KV sharing: step 1 stores its pre-RoPE K/V, later steps replace theirs by them.

`SDPAttention` is the local backend's core attention on `torch.nn.functional.
scaled_dot_product_attention`: flash / memory-efficient kernels on GPU, the fused CPU kernel here,
no materialised [b, np, s, s] scores for causal calls. It takes megatron's core-attention
signature (query [sq, b, np, hn], key/value [sk, b, ng, hn], or THD [t, np, hn] with
`PackedSeqParams`) and returns [sq, b, np * hn] like megatron's `DotProductAttention`.
Under Transformer Engine the same slot holds `TEDotProductAttention` (flash / cuDNN fused).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


@functools.lru_cache(maxsize=None)
def inverse_frequencies(head_dim: int, base: float, on_gpu: bool = False) -> torch.Tensor:
    """RoPE's inverse frequencies [d/2], from megatron's `RotaryEmbedding` (computed on the
    current CUDA device when `on_gpu`, as megatron does, else on the CPU)."""
    return RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=base,
                           use_cpu_initialization=not on_gpu).inv_freq


class Rotary:
    """RoPE at given positions, cos/sin computed once and shared by every layer (and recursion
    step) that attends over the same token set. The frequencies are megatron's `RotaryEmbedding`'s;
    megatron's apply path (`apply_rotary_pos_emb`) takes contiguous positions and recomputes
    cos/sin in every layer, while a gathered token set has arbitrary positions and its layers
    share them (benchmarks/rope.py measures the two; docs/performance.md). Non-interleaved
    (rotate-half) layout, whose angles repeat over the two halves: only one half is kept."""

    def __init__(self, positions: torch.Tensor, head_dim: int, base: float):
        """positions [s] (shared by the batch), [k, b] (per sequence) or [t, 1] (packed)."""
        inv = inverse_frequencies(head_dim, base, positions.device.type == "cuda").to(positions.device)
        ang = positions.to(torch.float32).unsqueeze(-1) * inv  # [..., d/2]
        ang = ang[:, None, None, :] if positions.dim() == 1 else ang[:, :, None, :]
        self.cos, self.sin = ang.cos(), ang.sin()
        self._cast: dict = {}

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """t [s, b, n, d] -> t rotated (x1, x2 halves: [x1 c - x2 s, x2 c + x1 s])."""
        if t.dtype not in self._cast:
            self._cast[t.dtype] = (self.cos.to(t.dtype), self.sin.to(t.dtype))
        c, s = self._cast[t.dtype]
        h = t.shape[-1] // 2
        t1, t2 = t[..., :h], t[..., h:]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)


@dataclass
class AttentionCall:
    """Set on a layer's `MoRSelfAttention` by the model before each call.

    kv_mode 'write' (recursion step 1) stores this layer's pre-RoPE K/V under `slot`; 'read'
    (later steps) replaces the K/V computed from the step's active tokens by step 1's K/V of all
    tokens, so queries of the surviving tokens really attend to the first step's keys/values.
    """

    mask_type: AttnMaskType = AttnMaskType.causal
    kv_mode: str = "off"  # off | write | read
    slot: int = 0
    store: dict = field(default_factory=dict)
    q_rotary: Optional[Rotary] = None  # RoPE of the queries' positions
    k_rotary: Optional[Rotary] = None  # of the keys' (KV-sharing reads: every position)


class MoRSelfAttention(SelfAttention):
    """megatron SelfAttention with a per-call mask type and recursive KV sharing."""

    call: Optional[AttentionCall] = None

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        # megatron reads the mask type from the module; a shared layer's changes per call.
        self.attn_mask_type = self.call.mask_type if self.call is not None else AttnMaskType.causal
        self.core_attention.attn_mask_type = self.attn_mask_type
        if self.call is not None and self.call.q_rotary is not None:
            kwargs["rotary_pos_emb"] = None  # applied here, from the call's precomputed cos/sin
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, *args, **kwargs)
        ctx = self.call
        if ctx is None:
            return out
        query, key, value = out[0], out[1], out[2]  # [s, b, n, d], before RoPE
        if ctx.kv_mode == "write":
            ctx.store[ctx.slot] = (key, value)
        elif ctx.kv_mode == "read":
            key, value = ctx.store[ctx.slot]
        if ctx.q_rotary is not None:
            query = ctx.q_rotary.apply(query)
            key = (ctx.k_rotary or ctx.q_rotary).apply(key)
        return (query, key, value) + tuple(out[3:])


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[t, t] bool, True = attend: causal within each packed sequence, nothing across them."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seg = torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)  # sequence of each row
    return (seg.unsqueeze(1) == seg.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))


class SDPAttention(MegatronModule):
    """Core attention on torch's scaled_dot_product_attention (local backend)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state

        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine (model.backend=te)")
        tp = (pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp")
              else parallel_state.get_tensor_model_parallel_world_size())
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.hidden_size_per_partition = config.kv_channels * self.heads
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("attention bias is not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        p = self.dropout if self.training else 0.0
        gqa = self.heads != self.groups
        if packed_seq_params is not None:  # THD: [t, np, hn]
            t = query.shape[0]
            allowed = packed_causal_mask(packed_seq_params.cu_seqlens_q, t)
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, n, t, d]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p,
                                                 scale=self.scale, enable_gqa=gqa)
            return out[0].transpose(0, 1).reshape(t, 1, -1)  # megatron reshapes to [t, 1, hp]
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, n, s, d]
        if attention_mask is None:
            if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                raise ValueError(f"attention mask type {mask_type.name} needs a mask tensor")
            out = F.scaled_dot_product_attention(q, k, v, is_causal=mask_type == AttnMaskType.causal,
                                                 dropout_p=p, scale=self.scale, enable_gqa=gqa)
        else:  # megatron's convention: True = masked; SDPA's: True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p,
                                                 scale=self.scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
