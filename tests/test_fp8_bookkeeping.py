"""FP8 bookkeeping of the shared recursion block, pinned with the Transformer Engine stand-in
(tests/te_standin.py): which layer calls refresh the FP8 weight casts, which contexts open and
how many amax reductions they cost, recompute, FP8 row counts of forward passes of any length,
and an evaluation loss that uses the current weights' casts. The stage, the trainer and
megatron's schedule are the real ones; only TE is stood in for."""

import contextlib
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

import te_standin  # noqa: E402
from single_process import make_model, tokens, world_of_one  # noqa: E402,F401 (fixture)


def _train_steps(model, steps=2, microbatches=2):
    """What megatron's schedule and optimizer do to a stage, by hand: mark the first
    micro-batch, forward + backward each micro-batch, change the weights."""
    model.train()
    for step in range(steps):
        model.set_is_first_microbatch()
        for mb in range(microbatches):
            model(input_ids=tokens(mb), labels=tokens(mb + 1)).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.sign(p.grad) if p.grad is not None else 0.0)
                p.grad = None
        if step < steps - 1:
            te_standin.REC.clear()


def _fp8_calls_by_module(calls):
    out = {}
    for c in calls:
        if c.fp8:
            out.setdefault(c.module, []).append(c)
    return out


@pytest.mark.parametrize("sharing,layers,bf16_layers", [
    ("cycle", 6, 1), ("sequence", 6, 1), ("middle_cycle", 8, 2), ("middle_sequence", 8, 2),
    ("middle_cycle", 8, 1)])
def test_first_fp8_call_of_each_step_refreshes_the_weight_casts(monkeypatch, sharing, layers,
                                                                bf16_layers):
    """A shared layer whose first call of a step is a bf16 edge layer must not consume TE's
    per-step flag: its first FP8 call refreshes the casts, no FP8 call uses stale ones."""
    rec = te_standin.install(monkeypatch)
    model = make_model("model.arch=mor", "model.backend=te", "train.precision=fp8",
                       f"model.sharing={sharing}", f"model.num_layers={layers}",
                       f"train.fp8_bf16_layers={bf16_layers}", fp8=True)
    te_standin.name_linears(model)
    _train_steps(model)
    calls = rec.calls  # the second step
    assert any(not c.fp8 for c in calls) and any(c.fp8 for c in calls)
    stale = sorted({c.module for c in calls if c.stale})
    assert stale == [], f"FP8 calls on stale weight casts: {stale}"
    for module, fp8_calls in _fp8_calls_by_module(calls).items():
        # exactly one refresh per step: the module's first FP8 call, given the flag
        assert [c.refreshed for c in fp8_calls] == [True] + [False] * (len(fp8_calls) - 1), module
        assert fp8_calls[0].first_microbatch is True, module
    assert not any(c.refreshed for c in calls if not c.fp8)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_delayed_scaling_opens_one_fp8_context_per_forward(monkeypatch, recompute):
    """Delayed scaling: one context around the layers (one amax reduction per forward, not one
    per layer call); every layer GEMM in FP8, recompute included (TE's checkpoint restores the
    state); routers and the output layer outside TE (plain torch / megatron-local)."""
    rec = te_standin.install(monkeypatch)
    model = make_model("model.arch=mor", "model.backend=te", "train.precision=fp8",
                       "train.fp8_recipe=delayed", "train.fp8_bf16_layers=0",
                       f"model.recompute={recompute}", fp8=True)
    te_standin.name_linears(model)
    model.train()
    model(input_ids=tokens(), labels=tokens(1)).mean().backward()
    assert rec.contexts == [-1] and rec.amax_reductions == 1
    layer_calls = [c for c in rec.calls if c.module.startswith("layers.")]
    assert len(layer_calls) == 8 * 4 * (2 if recompute == "full" else 1)
    assert all(c.fp8 for c in layer_calls)
    assert sum(c.recompute for c in layer_calls) == (8 * 4 if recompute == "full" else 0)
    assert rec.checkpoints == (8 if recompute == "full" else 0)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_current_scaling_opens_a_context_per_fp8_layer_call(monkeypatch, recompute):
    rec = te_standin.install(monkeypatch)
    model = make_model("model.arch=mor", "model.backend=te", "train.precision=fp8",
                       f"model.recompute={recompute}", fp8=True)
    te_standin.name_linears(model)
    model.train()
    model(input_ids=tokens(), labels=tokens(1)).mean().backward()
    times = 2 if recompute == "full" else 1  # recompute enters each layer's context again
    assert sorted(rec.contexts) == sorted(list(range(1, 7)) * times)  # 0, 7: bf16 edge layers
    assert rec.amax_reductions == 0
    edge = [c for c in rec.calls if not c.fp8]
    assert len(edge) == 2 * 4 * times and all(c.module.startswith("layers.") for c in edge)


TINY = ["model.preset=tiny", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.train_steps=4", "train.warmup_steps=1",
        "tracking.enabled=false", "tracking.peak_flops=1e12", "checkpoint.save_on_signal=false"]


def test_trainer_fp8_steps_depth_map_and_evaluation_loss(monkeypatch, tmp_path, builtin_root):
    """The trainer (bf16 Float16Module, DDP, distributed optimizer, megatron's schedule) with
    TE stood in, cycle sharing and one bf16 edge layer at each end:
    - training steps: no FP8 call uses a stale weight cast;
    - `batch_loss` (what the GPU check compares with fp32) refreshes the casts, as a training
      step's first micro-batch does; a direct call of the model after a step would reuse the
      casts of the weights before the optimizer step;
    - a depth map of 13 tokens passes TE's FP8 row assertion (padded to 16) and gives the
      depths of an unpadded pass without FP8."""
    from megatron.core import fp8_utils

    from megamor.config import load_config
    from megamor.data import get_batch
    from megamor.inference import routing_depths
    from megamor.training.depth_maps import routing_depths as training_depths
    from megamor.training.loop import Trainer

    rec = te_standin.install(monkeypatch)
    cfg = load_config(None, [*TINY, "model.backend=te", "train.precision=fp8",
                             "model.sharing=cycle", "model.num_layers=6",
                             "routing.type=token_choice", f"data.builtin_root={builtin_root}",
                             f"run.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    engine = trainer.engine
    te_standin.name_linears(engine.stage)
    assert engine.tcfg.fp8 and engine.stage.layers["0"].mlp.linear_fc1.weight.dtype == torch.bfloat16
    for _ in range(2):
        rec.clear()
        trainer.train_step()
        assert rec.calls and not [c.module for c in rec.calls if c.stale]
    batch = get_batch(trainer.data.dataset, [0, 1])
    # What the GPU check did before: the model called directly reuses the casts of the weights
    # before the last optimizer step.
    rec.clear()
    with torch.no_grad():
        engine.model(input_ids=batch["tokens"], labels=batch["labels"])
    assert [c for c in rec.calls if c.stale], "expected stale casts outside the schedule"
    rec.clear()
    loss = engine.batch_loss(batch["tokens"], batch["labels"])
    assert loss == loss and loss > 0
    assert rec.calls and not [c.module for c in rec.calls if c.stale]
    # Depth map of a 13-token sample: padded for FP8, same depths as without FP8 unpadded.
    ids = trainer.depth_maps.ids[:13]
    depths = training_depths(engine, ids)
    assert len(depths) == 13
    monkeypatch.setattr(fp8_utils, "get_fp8_context", lambda *a, **k: contextlib.nullcontext())
    engine.model.eval()
    assert routing_depths(engine.stage, ids) == depths
    # `megamor pretrain` keeps only the last step's metrics (a long run's are in metrics.jsonl).
    engine.model.train()
    assert [m["step"] for m in trainer.history] == [1, 2]
    trainer.keep_history = False
    trainer.train_step()
    assert [m["step"] for m in trainer.history] == [3]


def test_virtual_pipeline_chunks_refresh_casts_per_chunk_and_open_one_context_each(monkeypatch):
    """PP 2 x VP 2, pieces [2, 0, 3, 3] (stage 0's two chunks both run unique layer 1: one
    module), the chunks built as the ranks build them and run here in one process, piece after
    piece as the wire travels, TE stood in with delayed scaling. megatron's interleaved schedule
    marks each chunk's first micro-batch (`set_is_first_microbatch` on the chunk), so a layer
    that two chunks share refreshes its FP8 weight casts once per chunk, and no FP8 call uses
    the casts of weights from before the optimizer step. Each chunk forward with layers opens
    one FP8 context (one amax reduction); the empty chunk opens none."""
    from megamor.config import load_config
    from megamor.model import build_stage, transformer_config

    rec = te_standin.install(monkeypatch)
    cfg = load_config(None, [
        "model.preset=tiny", "model.seq_length=48", "model.arch=mor", "model.backend=te",
        "train.precision=fp8", "train.fp8_recipe=delayed", "train.fp8_bf16_layers=0",
        "parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_size=2",
        "parallel.pipeline_layers=[2,0,3,3]"]).validate(2)
    tcfg = transformer_config(cfg, torch.float32, fp8=True)
    stages = [build_stage(cfg, tcfg, 256, rank, seed=7) for rank in range(2)]
    for rank, stage in enumerate(stages):
        for name, m in stage.named_modules():  # each shared module once, by its first path
            if isinstance(m, te_standin._TEBookkeeping):
                m.standin_name = f"stage{rank}.{name}"
    parts = [stage.parts for stage in stages]
    assert parts[0][0].layers["1"] is parts[0][1].layers["1"]  # one module, two chunks
    pieces = [(0, 0), (1, 0), (0, 1), (1, 1)]  # piece j: stage j % 2, chunk j // 2
    for step in range(2):
        rec.clear()
        for mb in range(2):
            wire = None
            for s, c in pieces:
                chunk = parts[s][c]
                chunk.train()
                if mb == 0:
                    chunk.set_is_first_microbatch()
                if (s, c) == (0, 0):
                    wire = chunk(input_ids=tokens(mb))
                else:
                    chunk.set_input_tensor(wire)
                    wire = chunk(labels=tokens(mb + 1)) if (s, c) == (1, 1) else chunk()
            wire.mean().backward()
        with torch.no_grad():
            for stage in stages:
                for p in stage.parameters():
                    p.add_(1e-2 * torch.sign(p.grad) if p.grad is not None else 0.0)
                    p.grad = None
    calls = rec.calls  # the second step
    assert calls and not [c.module for c in calls if c.stale]
    assert rec.contexts == [-1] * 6 and rec.amax_reductions == 6  # 3 chunks with layers x 2
    by_module = _fp8_calls_by_module(calls)
    shared = [m for m in by_module if m.startswith("stage0.chunks.0.layers.1.")]
    assert shared and all(len(by_module[m]) == 4 for m in shared)
    for module, fp8_calls in by_module.items():
        refreshes = [c.refreshed for c in fp8_calls]
        assert refreshes[0] and sum(refreshes) == (2 if module in shared else 1), module
