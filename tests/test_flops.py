"""FLOPs model against counts done by hand (the numbers below are written out, not recomputed)."""

import pytest

from megamor.config import ModelConfig, RoutingConfig
from megamor.flops import PEAK_FLOPS, flops_per_step, gpu_kind, layer_matmul_params, mfu, \
    peak_flops_per_device
from megamor.layout import build_plan

# h = 8, 2 heads, 1 query group, head dim 4, FFN 16, vocabulary 32.
# Matmul weights per layer: QKV 8 x (2*4 + 2*1*4) = 128, proj 8 x 8 = 64,
# SwiGLU up+gate 8 x 32 = 256, down 16 x 8 = 128  ->  576.
# One causal (query, key) pair: 2 products (QK^T, AV) x 2 FLOPs x d 4 x 2 heads = 32 FLOPs.


def _cfg(**kw):
    base = dict(hidden_size=8, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=16)
    base.update(kw)
    return ModelConfig(**base)


def test_layer_params():
    assert layer_matmul_params(_cfg(arch="vanilla")) == 576


def test_vanilla_hand_count():
    # 2 layers, 2 sequences of 4 tokens: every layer processes 8 tokens.
    cfg = _cfg(arch="vanilla", num_layers=2, seq_length=4)
    plan = build_plan("vanilla", 2, 1, "cycle")
    out = flops_per_step(cfg, plan, [8, 8], seq_length=4, batch_sequences=2, vocab_size=32)
    # matmuls: 2 x 576 x 8 = 9216 per layer
    # attention: 4 tokens -> 4*5/2 = 10 pairs per sequence, x 32 x 2 sequences = 640 per layer
    # output: 2 x 8 x 32 x 8 tokens = 4096
    # forward = 2 x (9216 + 640) + 4096 = 23808; training = 3 x forward
    assert out["forward"] == 23808
    assert out["total"] == 71424
    assert out["layers"] == 3 * 18432
    assert out["attention"] == 3 * 1280
    assert out["output"] == 3 * 4096
    assert out["routers"] == 0
    assert out["per_layer"] == [3 * 9856, 3 * 9856]
    assert out["per_token"] == 71424 / 8


def test_mor_expert_choice_hand_count():
    # L = 5, middle-cycle, N_r = 3: prelude, step 1, step 2, step 3, coda (B = 1 layer per step).
    # 2 sequences of 6 tokens, capacities 1, 2/3, 1/3 -> k = 6, 4, 2 tokens per sequence.
    cfg = _cfg(arch="mor", num_layers=5, seq_length=6, num_recursions=3)
    plan = build_plan("mor", 5, 3, "middle_cycle", [1.0, 2 / 3, 1 / 3])
    tokens = [12, 12, 8, 4, 12]
    out = flops_per_step(cfg, plan, tokens, seq_length=6, batch_sequences=2, vocab_size=32,
                         routing_cfg=RoutingConfig(type="expert_choice"))
    # matmuls 2 x 576 = 1152 per token: 12 -> 13824 (x3 layers), 8 -> 9216, 4 -> 4608: 55296
    # attention pairs per sequence: k=6 -> 21, k=4 -> 10, k=2 -> 3
    #   32 x 21 x 2 = 1344 (x3 layers), 32 x 10 x 2 = 640, 32 x 3 x 2 = 192: 4864
    # routers 2 x 8 = 16 per scored token: step 1 scores 12, step 2 the 12 that step 1 kept,
    #   step 3 the 8 that step 2 kept: 16 x 32 = 512
    # output 2 x 8 x 32 x 12 = 6144
    # forward = 55296 + 4864 + 512 + 6144 = 66816
    assert out["forward"] == 66816
    assert out["total"] == 200448
    assert out["layers"] == 3 * 55296
    assert out["attention"] == 3 * 4864
    assert out["routers"] == 3 * 512
    assert out["output"] == 3 * 6144
    assert out["per_step"] == {0: 3 * 2 * (13824 + 1344), 1: 3 * (13824 + 1344),
                               2: 3 * (9216 + 640), 3: 3 * (4608 + 192)}


def test_mor_kv_sharing_and_routers_variants():
    cfg = _cfg(arch="mor", num_layers=5, seq_length=6, num_recursions=3, kv_sharing=True)
    plan = build_plan("mor", 5, 3, "middle_cycle", [1.0, 2 / 3, 1 / 3])
    tokens = [12, 12, 8, 4, 12]
    out = flops_per_step(cfg, plan, tokens, 6, 2, 32, RoutingConfig(type="expert_choice",
                                                                    causal="aux_router"))
    # KV sharing: steps 2 and 3 attend to step 1's keys: k x (6 + 1) / 2 pairs per sequence
    #   step 2: 4 x 3.5 = 14 -> 32 x 14 x 2 = 896; step 3: 2 x 3.5 = 7 -> 448
    #   total 1344 x 3 + 896 + 448 = 5376
    assert out["attention"] == 3 * 5376
    # aux router adds 2 x (8 x 4 + 4) = 72 per scored token: (16 + 72) x 32 = 2816
    assert out["routers"] == 3 * 2816
    tc = flops_per_step(_cfg(arch="mor", num_layers=5, seq_length=6), plan, [12, 12, 8, 4, 12],
                        6, 2, 32, RoutingConfig(type="token_choice"))
    # token-choice: one d -> N_r router on all 12 tokens: 2 x 8 x 3 x 12 = 576
    assert tc["routers"] == 3 * 576


def test_paper_360m_non_embedding_params():
    # MOR_SPEC table 1: the 360M vanilla model has 315M non-embedding parameters (32 layers)
    cfg = ModelConfig(arch="vanilla", num_layers=32, hidden_size=960, num_attention_heads=15,
                      num_query_groups=5, ffn_hidden_size=2560)
    assert 32 * layer_matmul_params(cfg) == pytest.approx(315e6, rel=0.005)


def test_mfu_and_peaks(monkeypatch):
    assert mfu(989e12 * 0.5 * 10 * 8, 10.0, 8, PEAK_FLOPS["h100-sxm"]["bf16"]) == pytest.approx(0.5)
    assert PEAK_FLOPS["h100-sxm"]["bf16"] == 989e12 and PEAK_FLOPS["h100-sxm"]["fp8"] == 1979e12
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_kind("NVIDIA H200") == "h200"
    assert peak_flops_per_device("fp8", device_name="NVIDIA H100 80GB HBM3") == 1979e12
    assert peak_flops_per_device("bf16", override=1.5e12) == 1.5e12
    with pytest.raises(ValueError):
        peak_flops_per_device("fp8", device_name="NVIDIA A100-SXM4-40GB")
    # No GPU: the CPU's measured matmul rate (2 n^3 FLOPs over the best of the timed matmuls),
    # cached per size and thread count. The figure itself is not asserted (the machine is shared).
    import megamor.flops as flops

    times = iter([10.0, 12.0, 20.0, 20.5, 30.0, 30.25])  # matmuls of 2, 0.5 and 0.25 s
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(times))
    monkeypatch.setattr(flops, "_CPU_PEAK", {})
    assert flops.measure_cpu_peak_flops(size=16, repeats=3) == 2 * 16**3 / 0.25
    assert flops.measure_cpu_peak_flops(size=16, repeats=3) == 2 * 16**3 / 0.25  # cached
    monkeypatch.setattr(flops, "measure_cpu_peak_flops", lambda: 123.0)
    assert peak_flops_per_device("fp32", device_name=None) == 123.0
