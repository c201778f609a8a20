"""Which of megatron-core's fused kernels a run turns on: one decision from the device and the
installed kernel packages (docs/cluster.md, "GPU kernels and collectives").

Each TransformerConfig fusion flag makes megatron call a kernel that exists only on a GPU, one of
them only with NVIDIA apex (built from source; the PyPI `apex` is another project). A flag on
without its kernel fails at construction or at the first step, so `apex_wgrad_available()` asks
megatron's own import result, and `fusion_flags()` turns on what exists and has a caller:

    flag                          kernel                                        on when
    bias_activation_fusion        SwiGLU, megatron's jit fuser (torch.compile)   CUDA
    bias_dropout_fusion           bias-dropout-add, megatron's jit fuser         CUDA
    cross_entropy_loss_fusion     megatron's fused vocab-parallel cross-entropy  CUDA + bf16
    gradient_accumulation_fusion  apex's fused_weight_gradient_mlp_cuda          CUDA + apex
    apply_rope_fusion             TE's fused RoPE                                never (below)
    masked_softmax_fusion         apex's scaled masked softmax                   never (below)
    persist_layer_norm            apex's persistent LayerNorm                    never: RMSNorm

- Gradient-accumulation fusion: the output layer is megatron's local ColumnParallelLinear under
  either backend, and it refuses the flag without apex's extension; with apex, Transformer
  Engine's linears fuse their weight-gradient accumulation too (`fuse_wgrad_accumulation`).
- RoPE and masked softmax: megatron calls these kernels only from its own RoPE and its unfused
  local attention. megamor applies RoPE itself (`model/attention.py` `Rotary`: angles computed
  once per token set and shared by its layers, per-sequence positions for gathered sets) and its
  core attention is torch SDPA (local) or TE's, so the flags would select nothing. TE's fused
  RoPE could serve full-length token sets only: it takes one angle table for the whole batch
  ([s, 1, 1, d]; its THD form restarts positions at each packed sequence), not the per-sequence
  original positions of a gathered set.
- Cross-entropy fusion: megatron's native fused kernel casts the logits' gradient to bf16 in
  its backward, whatever the model's dtype; an fp32 run keeps the unfused (fp32) loss.
Transformer Engine changes no flag here: its kernels (LayerNorm fused into the linear, cuDNN /
flash attention, FP8 GEMMs) live inside its modules. Not flags, chosen by megatron itself: fused
Adam and the multi-tensor grad norm / scale come from TE or apex when installed, else torch.
"""

from __future__ import annotations


def apex_wgrad_available() -> bool:
    """apex's `fused_weight_gradient_mlp_cuda`, as megatron's tensor-parallel layers found it."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def fusion_flags(device_type: str, apex_wgrad: bool, bf16: bool) -> dict[str, bool]:
    """TransformerConfig fusion flags for a run on `device_type` ("cuda" or "cpu"), given whether
    apex's weight-gradient kernel is installed and whether the model computes in bf16."""
    gpu = device_type == "cuda"
    return {
        "bias_activation_fusion": gpu,
        "bias_dropout_fusion": gpu,
        "cross_entropy_loss_fusion": gpu and bf16,
        "gradient_accumulation_fusion": gpu and apex_wgrad,
        "apply_rope_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }
