"""The program a GPU run executes, run on CPU: bf16 under megatron's Float16Module with fp32 main
gradients and megatron's distributed optimizer, fp32 routers, PP 2 with shared layers on both
stages, TP 2, token- and expert-choice, loss-free balancing, checkpoint save / resume and a
Hugging Face export, on gloo with a multi-backend default group, under the collective guard.

One launch of two ranks (tests/scenarios/bf16_program.py, MEGAMOR_CPU_BF16=1) trains six
runs (the sixth on a virtual pipeline, PP 2 x VP 2); the tests below read what it recorded.

bf16 tolerance. bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 (0.2%)
of itself. The bf16 and fp32 runs here share fp32 master weights, fp32 Adam state, fp32 gradient
reduction and fp32 routers, so they differ by the rounding of the activations and logits, and
by what that feeds back through 20 optimizer steps (a token routed to another depth, say).
Allowed: 0.5% of the loss at every step (2.5 roundings' worth), 0.1% on average over the steps.
Measured (2026-12-06): at most 0.21% (PP 2, one step), 0.03% on average; TP 2: 0.01%.
A whole-program error (a wrong main gradient, a missed shared-gradient reduction, a stage in the
wrong dtype) moves the loss by far more than that within a few steps.
"""

import json

import pytest
import torch

from conftest import run_ranks

STEPS, SAVE_EVERY, TP_STEPS = 20, 10, 8
PER_STEP, ON_AVERAGE = 5e-3, 1e-3


@pytest.fixture(scope="module")
def program(tmp_path_factory, builtin_root):
    tmp = tmp_path_factory.mktemp("bf16")
    run_ranks(2, "bf16_program.py", [
        "--out", str(tmp / "out"), "--root", str(tmp / "runs"), "--steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--tp-steps", str(TP_STEPS),
        "model.preset=tiny", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.warmup_steps=1", f"data.builtin_root={builtin_root}"],
        env={"MEGAMOR_CPU_BF16": "1"})
    return [json.loads((tmp / f"out.{r}").read_text()) for r in range(2)], tmp / "runs"


def _losses(run):
    return [h["loss"] for h in run["history"]]


def test_bf16_tracks_fp32(program):
    ranks, _ = program
    r = ranks[0]
    for bf16, fp32, n in (("pp2_bf16", "pp2_fp32", STEPS), ("tp2_bf16", "tp2_fp32", TP_STEPS)):
        a, b = _losses(r[bf16]), _losses(r[fp32])
        assert len(a) == len(b) == n
        rel = [abs(x - y) / y for x, y in zip(a, b)]
        assert max(rel) <= PER_STEP and sum(rel) / n <= ON_AVERAGE, (bf16, rel)
        assert a[-1] < a[0] - 0.2  # and it trains
    # Loss-free balancing moved the bias (depth loads change) in bf16 as in fp32.
    h = r["pp2_bf16"]["history"]
    assert any(h[0][k] != h[-1][k] for k in h[0] if k.startswith("router/depth"))


def test_the_stage_is_wrapped_as_on_a_gpu_with_fp32_routers(program):
    ranks, _ = program
    for rank, r in enumerate(ranks):
        for name in ("pp2_bf16", "tp2_bf16"):
            w = r[name]["wrapping"]
            assert w["chain"] == ["DistributedDataParallel", "Float16Module", "MoRModel"], name
            assert w["param_dtypes"] == ["bfloat16"] and w["main_grad_dtypes"] == ["float32"]
            assert w["optimizers"] == ["DistributedOptimizer"] and w["optimizer_bf16"] == [True]
            assert w["main_param_dtypes"] == ["float32"]
            # Routers (on every TP rank; at PP 2 token-choice's one router on the first stage):
            # parameters, buffers and scores fp32 inside the bf16 model.
            if name == "pp2_bf16" and rank == 1:
                assert w["router_params"] == {} and r[name]["scores"] == {}
                continue
            assert w["router_params"] and set(w["router_params"].values()) == {"float32"}
            assert set(w["router_buffers"].values()) <= {"float32"}
            assert r[name]["scores"] and all(d == ["float32"] for d in r[name]["scores"].values())
        fp32 = r["pp2_fp32"]["wrapping"]
        assert fp32["chain"] == ["DistributedDataParallel", "MoRModel"]
        assert fp32["param_dtypes"] == ["float32"] and fp32["optimizer_bf16"] == [False]
    # Token-choice's loss-free state lives on the first stage; expert-choice routers (and their
    # auxiliary inference routers) on every TP rank.
    first = ranks[0]["pp2_bf16"]["wrapping"]
    assert first["router_buffers"] == {"1.bias": "float32", "1.load": "float32"}
    assert len(ranks[0]["tp2_bf16"]["wrapping"]["router_params"]) == 9
    # PP 2 with shared recursion layers held by both stages (the middle-cycle block, 1 and 2).
    assert ranks[0]["pp2_bf16"]["wrapping"]["shared_layer_groups"] == [1, 2]
    assert ranks[1]["pp2_bf16"]["wrapping"]["shared_layer_groups"] == [1, 2]


def test_virtual_pipeline_chunks_run_the_gpu_program(program):
    """PP 2 x VP 2 in bf16: each chunk in its own Float16Module (which casts by the chunk's
    vp_stage: the first chunk's input, the last chunk's output), one DDP around the stage, the
    shared layer held once per rank; it tracks the contiguous fp32 run like PP 2 does."""
    ranks, _ = program
    for rank, r in enumerate(ranks):
        v = r["vp2_bf16"]
        assert v["chunks"] == [["Float16Module", "MoRModel", 0], ["Float16Module", "MoRModel", 1]]
        w = v["wrapping"]
        assert w["chain"] == ["DistributedDataParallel", "VirtualStage"]
        assert w["param_dtypes"] == ["bfloat16"] and w["main_grad_dtypes"] == ["float32"]
        assert w["optimizers"] == ["DistributedOptimizer"] and w["main_param_dtypes"] == ["float32"]
        assert set(w["router_params"].values()) <= {"float32"}
        assert set(w["router_buffers"].values()) <= {"float32"}
    # Stage 0 runs layers 0-4 (unique 0, 1, 2; unique 1 in both chunks), stage 1 layers 5-7.
    assert ranks[0]["vp2_bf16"]["wrapping"]["layers_here"] == [0, 1, 2]
    assert ranks[1]["vp2_bf16"]["wrapping"]["layers_here"] == [1, 2, 3]
    a, b = _losses(ranks[0]["vp2_bf16"]), _losses(ranks[0]["pp2_fp32"])[:TP_STEPS]
    rel = [abs(x - y) / y for x, y in zip(a, b, strict=True)]
    assert max(rel) <= PER_STEP and sum(rel) / TP_STEPS <= ON_AVERAGE, rel


def test_resumed_bf16_run_continues_bitwise(program):
    ranks, _ = program
    r = ranks[0]
    assert r["pp2_resume"]["resumed_at"] == SAVE_EVERY
    assert _losses(r["pp2_resume"]) == _losses(r["pp2_bf16"])[SAVE_EVERY:]
    grads = [h["grad_norm"] for h in r["pp2_resume"]["history"]]
    assert grads == [h["grad_norm"] for h in r["pp2_bf16"]["history"][SAVE_EVERY:]]


def test_wrapped_model_passes_the_collective_guard(program):
    ranks, _ = program
    for r in ranks:
        assert r["backend"] == "cpu:gloo,cuda:gloo" and r["cpu_bf16_env"] == "1"
        assert r["probe"] == {"host_flagged": 1, "device_passed": True}
        assert r["violations"] == [], "\n".join(r["violations"])
    seen = set(ranks[0]["calls"]) | set(ranks[1]["calls"])
    for call in ("all_reduce @ megamor/parallel.py:allreduce_shared_grads",
                 "all_reduce @ megamor/model/routing.py:update_bias",
                 "all_reduce @ megamor/training/metrics.py:reduce",
                 "all_gather_object @ megamor/checkpoint.py:save",
                 "all_gather_object @ megamor/checkpoint.py:read_shards"):
        assert call in seen, sorted(seen)
    assert any(k.startswith("isend @") for k in seen) and any(k.startswith("irecv @") for k in seen)
    inner = set(ranks[0]["inner"])
    assert "all_gather in all_gather_object @ megamor/checkpoint.py:save" in inner, inner


def test_export_of_the_bf16_checkpoint(program, tmp_path):
    """The bf16 run's checkpoint exports (PP 2 layout, one process): layer weights are bf16
    values, router weights keep fp32 precision, and the Hugging Face model computes what
    megatron's model loaded from the same checkpoint does."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from megamor.hf.export import export_checkpoint
    from megamor.inference import load_for_inference

    _, runs = program
    ckpt = runs / "pp2_bf16" / "checkpoints"
    out = export_checkpoint(ckpt, tmp_path / "hf")
    meta = json.loads((out / "megamor_export.json").read_text())
    assert meta["step"] == STEPS and meta["routing"] == "token_choice"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    sd = hf.state_dict()
    qkv = next(v for k, v in sd.items() if k.endswith("self_attn.q_proj.weight"))
    assert torch.equal(qkv, qkv.bfloat16().float())  # trained as bf16 parameters
    router = next(v for k, v in sd.items() if "routers" in k)
    assert not torch.equal(router, router.bfloat16().float())  # trained in fp32
    model, cfg, _ = load_for_inference(ckpt)
    ids = torch.arange(40).view(2, 20) % 500 + 3
    with torch.no_grad():
        want = model(input_ids=ids).transpose(0, 1)[..., :hf.config.vocab_size]
        got = hf(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
