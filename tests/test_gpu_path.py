"""The GPU path, checked on CPU: collectives an NCCL group accepts, fusions chosen from what is
installed, and the GPU check script's CPU smoke run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_ranks
from megamor.kernels import apex_wgrad_available, fusion_flags

TINY = ["model.preset=tiny", "model.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.train_steps=4", "train.warmup_steps=1",
        "train.log_interval=1"]


@pytest.mark.slow
def test_training_collectives_are_nccl_legal(tmp_path, builtin_root):
    """Step, save, signal, depth map and resume over PP2 with every torch.distributed call
    recorded: no host tensor reaches a collective (NCCL would reject it), and the guard saw
    each of megamor's own collectives (so it was looking)."""
    out = tmp_path / "guard"
    # Token-choice routing: its balancing loss and (after the resume, loss-free) bias update
    # reduce over data parallel; the checkpoint holds the same tensors under either balancing.
    run_ranks(2, "nccl_path.py", [
        "--out", str(out), "--resume-with=routing.balancing=loss_free", *TINY,
        "parallel.pipeline_model_parallel_size=2", "routing.type=token_choice",
        f"data.builtin_root={builtin_root}", f"run.output_dir={tmp_path / 'run'}"])
    ranks = [json.loads((tmp_path / f"guard.{r}").read_text()) for r in range(2)]
    for r in ranks:
        assert r["probe"] == {"host_flagged": 1, "device_passed": True}
        assert r["violations"] == [], "\n".join(r["violations"])
        assert r["exit"] == 75 and r["resumed_at"] == 3
        assert len(r["losses"]) == 4 and all(math.isfinite(l) for l in r["losses"])
    assert len(ranks[0]["depths"]) == 16 and ranks[1]["depths"] is None
    seen = set(ranks[0]["calls"]) | set(ranks[1]["calls"])
    expected = {
        "all_reduce @ megamor/training/metrics.py:reduce",
        "all_reduce @ megamor/training/signals.py:agreed",
        "all_reduce @ megamor/parallel.py:allreduce_shared_grads",
        "all_gather_object @ megamor/training/depth_maps.py:routing_depths",
        "all_reduce @ megamor/model/routing.py:balancing_loss",
        "all_reduce @ megamor/model/routing.py:update_bias",
    }
    assert expected <= seen, sorted(seen)
    for call in ("barrier", "all_gather_object"):  # checkpoint save and load
        assert any(k.startswith(f"{call} @ megamor/checkpoint.py:") for k in seen), sorted(seen)
    assert any(k.startswith(("isend @", "send @")) for k in seen), sorted(seen)
    assert any(k.startswith(("irecv @", "recv @")) for k in seen), sorted(seen)


JIT = {"bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion"}


def on(flags: dict) -> set:
    return {k for k, v in flags.items() if v}


def test_fusions_follow_device_and_installed_kernels():
    """GPU: megatron's jit-fused kernels always, its fused cross-entropy in bf16 only (its
    backward casts the logits' gradient to bf16), apex's weight-gradient fusion when apex is
    there (Transformer Engine alone changes no flag: the local output layer needs apex's kernel);
    CPU: none. Then the flags in the TransformerConfig megamor builds."""
    from megamor.config import load_config
    from megamor.model import transformer_config

    assert on(fusion_flags("cuda", apex_wgrad=False, bf16=True)) == JIT  # neither, or TE only
    assert on(fusion_flags("cuda", apex_wgrad=True, bf16=True)) == \
        JIT | {"gradient_accumulation_fusion"}
    assert on(fusion_flags("cuda", apex_wgrad=False, bf16=False)) == \
        JIT - {"cross_entropy_loss_fusion"}
    assert on(fusion_flags("cpu", apex_wgrad=True, bf16=True)) == set()
    names = set(fusion_flags("cpu", False, False))
    cfg = load_config(None, ["model.preset=tiny"])
    assert {k for k in names if getattr(transformer_config(cfg, torch.float32), k)} == set()
    # GPU configs with what this machine has (megatron validates the flags it is given).
    for dtype in (torch.float32, torch.bfloat16):
        gpu = transformer_config(cfg, dtype, device_type="cuda")
        assert {k for k in names if getattr(gpu, k)} == \
            on(fusion_flags("cuda", apex_wgrad_available(), dtype == torch.bfloat16))
    assert not transformer_config(cfg, torch.float32, device_type="cuda").cross_entropy_loss_fusion
    assert transformer_config(cfg, torch.bfloat16, device_type="cuda").cross_entropy_loss_fusion


@pytest.mark.slow
def test_gpu_check_driver_runs_on_cpu(tmp_path, builtin_root):
    """`benchmarks/gpu_check.sh --cpu-smoke`: the GPU check's driver end to end on CPU/gloo, in
    bf16 (Float16Module, distributed optimizer) over a multi-backend default group
    (`cpu:gloo,cuda:gloo`, the shape of a GPU run's): train, save, resume in the next run, fp32
    reference, figures, a one-line verdict. Its collective guard is the suite's: it is looking
    (a host tensor is flagged on the live group) and passes the checkpoint save and load paths'
    object collectives, whose inner tensor collectives run on the group's CPU side."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path),
         "--data-root", str(builtin_root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("gpu_check: PASS: 2 of 2 runs passed on cpu"), verdict
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["probe"] == {"host_flagged": 1, "device_passed": True}
    first, second = out["runs"]
    assert first["saved"] and second["resumed_at"] == 3
    for r in (first, second):
        assert r["backend"] == "cpu:gloo,cuda:gloo" and r["precision"] == "bf16"
        assert 0.0 < r["rel_diff"] <= 2e-2 and r["tokens_per_s"] > 0 and r["violations"] == []
    for r, path in ((first, "save"), (second, "read_shards")):
        assert f"all_gather_object @ megamor/checkpoint.py:{path}" in r["object_collectives"], r
        assert r["inner_calls"][f"all_gather in all_gather_object @ megamor/checkpoint.py:{path}"]


def test_one_guard_judges_real_devices_as_on_a_gpu(monkeypatch):
    """The guard's GPU rule (what the GPU check applies there), on CPU tensors, which a GPU
    machine's NCCL would reject: a tensor collective with one is a violation; object
    collectives on a multi-backend group are not, although torch runs tensor collectives on CPU
    tensors inside them (the GPU check's former rule flagged those: megatron's checkpoint save
    failed the check on its first run); groups made with an explicit gloo backend are exempt."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from megamor.parallel import _free_port
    from megamor.testing.collective_guard import OBJECT_CALLS, TENSOR_CALLS, Guard

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("cpu:gloo,cuda:gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    try:
        group = dist.new_group([0], backend="cpu:gloo,cuda:gloo")
        guard = Guard("cuda")
        for name in TENSOR_CALLS + OBJECT_CALLS:
            if hasattr(c10d, name):
                w = guard.wrap(name, getattr(c10d, name))
                monkeypatch.setattr(c10d, name, w)
                monkeypatch.setattr(dist, name, w)
        gloo = guard.wrap_new_group(c10d.new_group)([0], backend="gloo")
        objs = [None]
        dist.all_gather_object(objs, {"step": 3}, group=group)
        dist.broadcast_object_list(objs, src=0, group=group)
        dist.barrier(group=group)
        assert objs == [{"step": 3}] and guard.violations == []
        assert guard.inner["all_gather in all_gather_object @ outside megamor"] == 2
        assert guard.inner["broadcast in broadcast_object_list @ outside megamor"] == 2
        dist.all_reduce(torch.zeros(1), group=gloo)  # megatron's *_GLOO groups: exempt
        assert guard.violations == []
        dist.all_reduce(torch.zeros(2), group=group)
        assert len(guard.violations) == 1 and "a cpu tensor (2,)" in guard.violations[0]
    finally:
        if own:
            dist.destroy_process_group()
