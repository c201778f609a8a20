"""Training FLOPs of one optimizer step, charging each recursion step for the tokens it processed.

MOR_SPEC.md section 6: "6 x non-embedding params per token per applied layer, plus causal
attention, with each recursion step charged for the tokens it actually processed". Precisely,
with h = hidden size, n_h = attention heads, n_g = query groups, d = head dim, f = FFN size,
V = vocabulary, T = sequence length, B = sequences in the step (global batch), and n_l = tokens
unrolled layer l processed in the step (summed over the global batch, `layer_tokens[l]`, the
trainer's `layer_tokens` metric):

forward FLOPs (one multiply-add = 2 FLOPs)
  matmuls of layer l   2 * P * n_l,  P = h*(n_h*d + 2*n_g*d)  (QKV)  + n_h*d*h  (output proj)
                                        + h*2f  (SwiGLU gate+up)  + f*h  (down)
                       (norm weights, softmax, RoPE and other elementwise work are not counted)
  attention of layer l 2 * 2 * d * n_h * pairs_l * B   (QK^T and AV; one (query, key) pair costs
                       2d per head for each of the two products), where pairs_l, the causal
                       (query, key) pairs per sequence with k = n_l / B active tokens, is
                         k (k + 1) / 2            tokens attend among the active ones, diagonal
                                                  included (every layer of vanilla/recursive
                                                  models: k = T)
                         k (T + 1) / 2            recursive KV sharing, steps >= 2: the k queries
                                                  attend to step 1's keys of all tokens up to
                                                  their position (taken at the mean position)
                       Expert-choice selects exactly k per sequence, so this is exact; token-choice
                       counts differ per sequence and the mean k gives a lower bound.
  routers (MoR)        expert-choice, step r: 2 * h * reached_r, reached_r = tokens that reached
                       step r (B*T for r = 1, else the tokens processed by step r-1's layers);
                       with `routing.causal = aux_router` add 2 * (h*(h/2) + h/2) * reached_r.
                       token-choice: 2 * h * N_r * B*T once.
  output layer         2 * h * V * B*T   (the tied embedding lookup costs nothing)
training FLOPs = 3 x forward (backward = 2 x forward), for every term.

Peak FLOP/s. `PEAK_FLOPS` holds NVIDIA's dense (no sparsity) datasheet numbers per GPU;
`measure_cpu_peak_flops` times a square fp32 matmul with the current torch thread count (CPU has
no datasheet number that is meaningful for torch); `peak_flops_per_device` picks one, an explicit
value (e.g. from the config) winning over both.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

from megamor.layout import Plan

# Dense peak FLOP/s per device (NVIDIA datasheets, without structured sparsity).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"fp8": 1979e12, "bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "h100-pcie": {"fp8": 1513e12, "bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "h200": {"fp8": 1979e12, "bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def layer_matmul_params(model_cfg) -> int:
    """Weights of one transformer layer's matmuls (QKV, output projection, SwiGLU MLP)."""
    h, d = model_cfg.hidden_size, model_cfg.head_dim
    nh, ng, f = model_cfg.num_attention_heads, model_cfg.num_query_groups, model_cfg.ffn_hidden_size
    return h * (nh * d + 2 * ng * d) + nh * d * h + h * 2 * f + f * h


def flops_per_step(model_cfg, plan: Plan, layer_tokens: list[float], seq_length: int,
                   batch_sequences: int, vocab_size: int, routing_cfg=None) -> dict:
    """Training FLOPs (forward + backward) of one step; see the module docstring for the formula.

    `layer_tokens[l]`: tokens processed by unrolled layer l in the step, summed over the batch of
    `batch_sequences` sequences of `seq_length` tokens. `routing_cfg` (a RoutingConfig) selects
    the router type; default expert-choice with the linear router.

    Returns training FLOPs: `total`, the breakdown `layers` (matmuls), `attention`, `routers`,
    `output`, plus `forward` (total / 3), `per_layer` (matmuls + attention of each unrolled
    layer), `per_step` ({recursion step: FLOPs of its layers}, 0 = outside the recursion),
    `tokens` (B*T) and `per_token` (total / tokens), `per_layer_router` (router FLOPs charged to
    the unrolled layer whose input the router scores).
    """
    if len(layer_tokens) != len(plan.layers):
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries, the plan "
                         f"{len(plan.layers)} unrolled layers")
    h, d, nh = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.num_attention_heads
    T, B = seq_length, batch_sequences
    tokens = float(T * B)
    P = layer_matmul_params(model_cfg)
    routed = model_cfg.arch == "mor"
    kv_sharing = bool(getattr(model_cfg, "kv_sharing", False))

    per_layer_fwd, matmul_fwd, attn_fwd = [], 0.0, 0.0
    per_step: dict[int, float] = {}
    for l, n in zip(plan.layers, layer_tokens):
        n = float(n)
        mm = 2.0 * P * n
        k = n / B
        if kv_sharing and l.step >= 2:
            pairs = k * (T + 1) / 2.0
        else:
            pairs = k * (k + 1) / 2.0
        at = 4.0 * d * nh * pairs * B
        matmul_fwd += mm
        attn_fwd += at
        per_layer_fwd.append(mm + at)
        per_step[l.step] = per_step.get(l.step, 0.0) + 3.0 * (mm + at)

    router_fwd = 0.0
    router_layer = [0.0] * len(plan.layers)
    if routed:
        rtype = getattr(routing_cfg, "type", "expert_choice")
        first = {l.step: l.index for l in plan.layers if l.first_in_step}
        if rtype == "token_choice":
            router_fwd = 2.0 * h * model_cfg.num_recursions * tokens
            router_layer[first[1]] = router_fwd
        else:
            aux = getattr(routing_cfg, "causal", "aux_loss") == "aux_router"
            per_token = 2.0 * h + (2.0 * (h * (h // 2) + h // 2) if aux else 0.0)
            for step in sorted(first):
                reached = tokens if step == 1 else float(layer_tokens[first[step - 1]])
                router_fwd += per_token * reached
                router_layer[first[step]] = per_token * reached

    output_fwd = 2.0 * h * vocab_size * tokens
    forward = matmul_fwd + attn_fwd + router_fwd + output_fwd
    return {
        "total": 3.0 * forward,
        "forward": forward,
        "layers": 3.0 * matmul_fwd,
        "attention": 3.0 * attn_fwd,
        "routers": 3.0 * router_fwd,
        "output": 3.0 * output_fwd,
        "per_layer": [3.0 * x for x in per_layer_fwd],
        "per_step": per_step,
        "per_layer_router": [3.0 * x for x in router_layer],
        "tokens": tokens,
        "per_token": 3.0 * forward / tokens,
    }


def mfu(flops: float, seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
    if seconds <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
        return float("nan")
    return flops / (seconds * num_devices * peak_flops_per_device)


def gpu_kind(device_name: str) -> Optional[str]:
    """Key of `PEAK_FLOPS` for a CUDA device name (torch.cuda.get_device_name), or None."""
    name = device_name.upper()
    if "H200" in name:
        return "h200"
    if "H100" in name:
        return "h100-pcie" if "PCIE" in name else "h100-sxm"
    if "A100" in name:
        return "a100"
    return None


_CPU_PEAK: dict[tuple, float] = {}


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a size x size matmul on this CPU with torch's current thread count
    (cached per size and thread count): the practical peak MFU is quoted against on CPU."""
    import torch

    key = (size, torch.get_num_threads())
    if key in _CPU_PEAK:
        return _CPU_PEAK[key]
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    _CPU_PEAK[key] = 2.0 * size**3 / best
    return _CPU_PEAK[key]


def peak_flops_per_device(precision: str = "bf16", override: Optional[float] = None,
                          device_name: Optional[str] = None) -> float:
    """Peak FLOP/s of one device: `override` if given; else the datasheet number of the visible
    (or named) GPU at `precision`; else a CPU measurement (`measure_cpu_peak_flops`)."""
    if override:
        return float(override)
    if device_name is None:
        import torch

        if torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
    if device_name is not None:
        kind = gpu_kind(device_name)
        if kind is None:
            raise ValueError(f"no peak FLOP/s known for GPU {device_name!r}; pass it explicitly")
        table = PEAK_FLOPS[kind]
        if precision not in table:
            raise ValueError(f"no peak FLOP/s for {precision} on {kind} (known: {', '.join(table)})")
        return table[precision]
    return measure_cpu_peak_flops()


# ----------------------------------------------------------------------------- pipeline cost model


def expected_layer_tokens(plan: Plan, seq_length: int) -> list[float]:
    """Tokens of one sequence each unrolled layer is expected to process: all T outside routed
    steps, k_r = max(1, floor(c_r T)) inside (exact for expert-choice, the balanced-load mean for
    token-choice)."""
    return [float(seq_length) if l.cost >= 1.0 else float(max(1, int(l.cost * seq_length)))
            for l in plan.layers]


class LayerOverhead(NamedTuple):
    """Time a transformer layer spends outside matmuls, in units of FLOPs' time: `proportional`
    grows with the layer's tokens (fused attention below matmul speed, norms, RoPE, SwiGLU,
    residual adds, copies), `fixed` does not (per call: kernel launches, Python, a routed step's
    router, top-k and gather/scatter), as a fraction of a full-length layer's FLOPs. The output
    layer is one large matmul and pays neither."""
    proportional: float = 0.0
    fixed: float = 0.0


# cpu: fitted by one unrolled layer per pipeline stage (`python benchmarks/pipeline_balance.py
# --overhead`, 2026-11-30): full-length layers, one-third-token layers and the output layer
# (0.150 / 0.068 / 0.118 s) give 0.33 / 0.33 at hidden 256, sequence 256; checked by the stage
# balance it predicts (docs/performance.md). cuda: not measured yet, 0 (the cut balances FLOPs).
LAYER_OVERHEAD = {"cpu": LayerOverhead(0.33, 0.33), "cuda": LayerOverhead(0.0, 0.0)}


def pipeline_costs(model_cfg, plan: Plan, seq_length: int, vocab_size: int, routing_cfg=None,
                   layer_overhead: LayerOverhead | float = 0.0):
    """What each piece of one sequence costs a pipeline stage, in training FLOPs (the FLOPs model
    above at the expected token counts): `layers[l]` = matmuls + attention of unrolled layer l at
    its tokens + the router scoring its input; `first` = the embedding lookup (no FLOPs);
    `last` = the output layer (the loss's softmax is elementwise, not counted); every layer's
    cost is scaled by 1 + the proportional overhead and charged the fixed overhead
    (`LAYER_OVERHEAD[device]`; a float is a proportional overhead alone). Attention is
    charged for the causal pairs only: both backends run fused causal kernels (torch SDPA,
    Transformer Engine) that skip the masked half. Checked against measured per-stage CPU time
    (tests/test_planner.py, benchmarks/pipeline_balance.py). Returns a
    `megamor.layout.StageCosts`, the input of `balanced_cut` / `stage_ranges`.
    """
    from megamor.layout import StageCosts

    o = layer_overhead if isinstance(layer_overhead, LayerOverhead) else LayerOverhead(layer_overhead)
    fl = flops_per_step(model_cfg, plan, expected_layer_tokens(plan, seq_length), seq_length, 1,
                        vocab_size, routing_cfg)
    full = max(fl["per_layer"])  # a layer over every token
    layers = tuple((1.0 + o.proportional) * (a + r) + o.fixed * full
                   for a, r in zip(fl["per_layer"], fl["per_layer_router"]))
    return StageCosts(layers=layers, first=0.0, last=fl["output"])
