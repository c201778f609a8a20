"""Tensor layout conversions between megatron-core's fused layers and Llama's separate ones.

megatron's `linear_qkv` weight stacks, per query group g, the group's query heads, then its key
head, then its value head: rows [q_g0 .. q_g(n-1) | k_g | v_g] for g = 0..G-1 (heads of
`head_dim` rows each). Llama keeps q_proj [H*d, h], k_proj [G*d, h], v_proj [G*d, h].
megatron's gated `linear_fc1` stacks [gate; up] (SwiGLU: silu(gate) * up); Llama has gate_proj
and up_proj. Everything else maps one to one (see LAYER_KEYS).
"""

from __future__ import annotations

import torch

# megatron (local spec) name inside one TransformerLayer -> Llama name inside one decoder layer,
# for the tensors that map one to one.
LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"


def split_qkv(w: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron fused [G*(H/G+2)*d, h] -> (q [H*d, h], k [G*d, h], v [G*d, h])."""
    per = heads // groups
    hidden = w.shape[-1]
    if w.shape[0] != groups * (per + 2) * head_dim:
        raise ValueError(f"linear_qkv has {w.shape[0]} rows, expected {groups * (per + 2) * head_dim} "
                         f"for {heads} heads, {groups} groups, head_dim {head_dim}")
    g = w.view(groups, per + 2, head_dim, hidden)
    q = g[:, :per].reshape(heads * head_dim, hidden)
    k = g[:, per].reshape(groups * head_dim, hidden)
    v = g[:, per + 1].reshape(groups * head_dim, hidden)
    return q.clone(), k.clone(), v.clone()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
              head_dim: int) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    per = heads // groups
    hidden = q.shape[-1]
    qg = q.reshape(groups, per, head_dim, hidden)
    kg = k.reshape(groups, 1, head_dim, hidden)
    vg = v.reshape(groups, 1, head_dim, hidden)
    return torch.cat([qg, kg, vg], dim=1).reshape(groups * (per + 2) * head_dim, hidden).contiguous()


def split_fc1(w: torch.Tensor):
    """[gate; up] -> (gate_proj, up_proj)."""
    gate, up = torch.chunk(w, 2, dim=0)
    return gate.clone(), up.clone()


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0).contiguous()


def layer_to_hf(sd: dict, prefix: str, heads: int, groups: int, head_dim: int) -> dict:
    """One megatron layer's tensors (keys `prefix + megatron name`) -> Llama layer names."""
    out = {hf: sd[prefix + mg] for mg, hf in LAYER_KEYS.items()}
    out["self_attn.q_proj.weight"], out["self_attn.k_proj.weight"], out["self_attn.v_proj.weight"] = \
        split_qkv(sd[prefix + QKV], heads, groups, head_dim)
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = split_fc1(sd[prefix + FC1])
    return out


def layer_from_hf(sd: dict, prefix: str, heads: int, groups: int, head_dim: int) -> dict:
    """One Llama layer's tensors (keys `prefix + Llama name`) -> megatron layer names."""
    out = {mg: sd[prefix + hf] for mg, hf in LAYER_KEYS.items()}
    out[QKV] = merge_qkv(sd[prefix + "self_attn.q_proj.weight"], sd[prefix + "self_attn.k_proj.weight"],
                         sd[prefix + "self_attn.v_proj.weight"], heads, groups, head_dim)
    out[FC1] = merge_fc1(sd[prefix + "mlp.gate_proj.weight"], sd[prefix + "mlp.up_proj.weight"])
    return out
