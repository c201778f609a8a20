"""The DeepSpeed engine (`parallel.engine=deepspeed`).

One 2-rank gloo launch (tests/scenarios/deepspeed_runs.py) trains every case; the tests read its
result. Loss equality with the megatron engine: the same seeded initialisation and data order
make step 1's forward identical, so its loss must be bitwise equal; later steps may differ in
the last bits because the two engines reduce fp32 gradients in a different order (megatron's DDP
buckets vs DeepSpeed's flat ZeRO partitions) and sum the clipping norm differently: a relative
tolerance of 1e-6 (fp32 epsilon is 1.2e-7) over 3 steps. Stop and resume within the engine is
bitwise.

Also here, in-process: the generated DeepSpeed config (the GPU-only choices pinned on CPU) and
the engine's configuration errors.
"""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import run_ranks

pytest.importorskip("deepspeed")

from megamor.config import ConfigError, load_config  # noqa: E402

KINDS = ("mor_ec", "mor_tc", "vanilla")
RUNS = {1: ["mor_ec"], 2: list(KINDS), 3: [*KINDS, "mor_ec_tp2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, builtin_root):
    root = tmp_path_factory.mktemp("deepspeed")
    run_ranks(2, "deepspeed_runs.py", ["--root", str(root), f"data.builtin_root={builtin_root}"],
              timeout=900)
    return root, json.loads((root / "result.json").read_text())


def close(a, b, rel=1e-6):
    return all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.slow
def test_zero_stages_reproduce_the_megatron_engine(runs):
    _, r = runs
    for z, kinds in RUNS.items():
        for kind in kinds:
            got, ref = r[f"zero{z}/{kind}"]["loss"], r[f"reference/{kind}"]["loss"]
            assert got[0] == ref[0], (z, kind, got, ref)
            assert close(got, ref), (z, kind, got, ref)
            assert close(r[f"zero{z}/{kind}"]["grad_norm"], r[f"reference/{kind}"]["grad_norm"], 1e-5)


@pytest.mark.slow
def test_stop_and_resume_continues_identically(runs):
    _, r = runs
    for z in (2, 3):
        full, resumed = r[f"resume{z}/full"]["loss"], r[f"resume{z}/resumed"]["loss"]
        assert len(full) == 4 and resumed == full[2:], (z, full, resumed)


@pytest.mark.slow
def test_corrupt_engine_state_is_skipped_and_non_finite_steps_change_nothing(runs):
    """Issue 19, the DeepSpeed engine: its engine-state files are checksummed like the shards
    (--resume auto falls back past a damaged one), and a non-finite step's update never reaches
    the weights (DeepSpeed's own skip, counted by megamor), at ZeRO-2 and ZeRO-3."""
    root, r = runs
    assert "deepspeed/state/" in r["corrupt/file"]
    assert r["corrupt"]["resumed_from"].endswith("step_00000002")
    assert r["corrupt"]["loss"] == r["resume2/full"]["loss"][2:]  # exactly the run it continues
    for z in (2, 3):
        res = r[f"nonfinite/zero{z}"]
        w = res["weights"]  # w[k]: after step k
        assert res["nonfinite"] == [0, 0, 1, 0], (z, res["nonfinite"])
        assert w[2] == w[3] and w[3] != w[4] and w[1] != w[2], (z, w)


@pytest.mark.slow
def test_offload_reaches_deepspeed_and_trains(runs):
    _, r = runs
    ref = r["reference/mor_ec"]["loss"]
    opt = r["offload/zero2_optimizer"]
    assert opt["engine"] == {"offload_optimizer": True, "offload_param": False, "zero_stage": 2,
                             "optimizer": "AdamW"}
    both = r["offload/zero3_all"]
    assert both["engine"] == {"offload_optimizer": True, "offload_param": True, "zero_stage": 3,
                              "optimizer": "AdamW"}
    for run in (opt, both):
        assert run["loss"][0] == ref[0] and close(run["loss"], ref)


@pytest.mark.slow
def test_zero3_gathers_the_shared_block_once_per_loop(runs):
    """Bytes of the shared block's weights all-gathered per step (per rank), DeepSpeed releasing
    after every use: its per-module fetch gathers the block at each of the N_r recursion steps
    of the forward; held over the loop it is gathered once in the forward and once in the
    backward."""
    _, r = runs
    block, micro, nr = r["traffic/shared_block_bytes"], r["traffic/num_microbatches"], 3
    assert block > 0
    once, naive = r["traffic/once"], r["traffic/deepspeed"]
    assert once["residency_gathers"] == 2 * micro * len(once["loss"])
    for o, n in zip(once["zero3"], naive["zero3"]):
        assert o["zero3/shared_block_forward_bytes"] == micro * block
        assert n["zero3/shared_block_forward_bytes"] == nr * micro * block  # ratio 1 / N_r
        assert o["zero3/shared_block_backward_bytes"] == micro * block
        assert n["zero3/shared_block_backward_bytes"] > o["zero3/shared_block_backward_bytes"]
        assert n["zero3/allgather_bytes"] - o["zero3/allgather_bytes"] == (
            n["zero3/shared_block_forward_bytes"] + n["zero3/shared_block_backward_bytes"]
            - o["zero3/shared_block_forward_bytes"] - o["zero3/shared_block_backward_bytes"])
    assert once["loss"] == naive["loss"]  # holding changes traffic, not numbers


@pytest.mark.slow
def test_weights_move_between_engines(runs):
    _, r = runs
    ds, meg = torch.tensor(r["logits"]), torch.tensor(r["reference/mor_ec"]["logits"])
    torch.testing.assert_close(torch.tensor(r["cross/megatron_from_deepspeed"]["logits"]), ds,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r["cross/deepspeed_from_megatron"]["logits"]), meg,
                               rtol=1e-5, atol=1e-5)
    msg = r["cross/refused"]
    assert msg and "parallel.engine=deepspeed" in msg and "checkpoint.init_from=" in msg


@pytest.mark.slow
def test_deepspeed_checkpoint_exports_to_hf_with_the_training_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, r = runs
    dest = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "convert", "to-hf",
                           str(root / "logits" / "checkpoints"), str(dest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(torch.tensor([r["logits_ids"]])).logits[0]
    want = torch.tensor(r["logits"])
    torch.testing.assert_close(got[:, :want.shape[1]], want, rtol=1e-4, atol=1e-4)
    # The other readers of a checkpoint: the depth-map command, and the run's own depth map.
    out = tmp_path / "depth"
    proc = subprocess.run([sys.executable, "-m", "megamor.cli", "depth-map",
                           str(root / "logits" / "checkpoints"), "--text", "def main(): return 0",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (out / "depth_map.html").is_file(), proc.stderr[-3000:]
    assert (root / "logits" / "depth_maps" / "step_00000003.html").is_file()


# ----------------------------------------------------------------------------- in-process


def test_engine_state_is_loaded_without_arbitrary_unpickling(tmp_path):
    """Resume reads DeepSpeed's files through `load_engine_file` (the resume test above passes
    through it); a file holding any other object is refused, naming it, and nothing runs."""
    from megamor.checkpoint import CheckpointError
    from megamor.engines.deepspeed_config import load_engine_file
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ok = tmp_path / "ok.pt"
    torch.save({"zero_stage": ZeroStageEnum(3), "w": torch.ones(2)}, ok)
    assert load_engine_file(str(ok))["zero_stage"] == ZeroStageEnum(3)
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"x": _Runs(str(marker))}, bad)
    with pytest.raises(CheckpointError, match="bad.pt: not loaded"):
        load_engine_file(str(bad))
    assert not marker.exists()


class _Runs:
    """Unpickling this calls Path.touch: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (Path(self.path),))


def test_generated_config_pins_the_gpu_choices():
    from megamor.engines.deepspeed_config import deepspeed_config

    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                             "parallel.offload_optimizer=cpu", "parallel.offload_params=cpu",
                             "train.global_batch_size=32", "train.micro_batch_size=2",
                             "train.clip_grad=0.5", "train.weight_decay=0.05"])
    gpu = deepspeed_config(cfg, dp=8, num_microbatches=2, device_type="cuda", bf16=True)
    assert gpu["train_batch_size"] == 32 == 2 * 2 * 8
    assert gpu["gradient_accumulation_steps"] == 2 and gpu["gradient_clipping"] == 0.5
    assert gpu["bf16"] == {"enabled": True}
    z = gpu["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    # Offload on GPUs: DeepSpeed's CPUAdam (torch_adam absent), DeepSpeed's own check kept.
    assert "torch_adam" not in gpu["optimizer"]["params"]
    assert "zero_force_ds_cpu_optimizer" not in gpu
    assert gpu["optimizer"]["params"]["weight_decay"] == 0.05
    cpu = deepspeed_config(cfg, dp=8, num_microbatches=2, device_type="cpu", bf16=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["zero_force_ds_cpu_optimizer"] is False
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    plain = load_config(None, ["parallel.engine=deepspeed"])
    assert deepspeed_config(plain, 1, 4, "cuda", True)["optimizer"]["params"]["torch_adam"] is True


def test_json_overrides_are_merged_and_reported(tmp_path):
    from megamor.engines.deepspeed_config import apply_overrides

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage3_max_reuse_distance": 0, "stage": 3},
                             "gradient_clipping": 1.0}))
    merged, lines = apply_overrides({"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5},
                                    str(f))
    assert merged == {"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0},
                      "gradient_clipping": 1.0}
    assert lines == ["zero_optimization.stage3_max_reuse_distance: '(unset)' -> 0",
                     "gradient_clipping: 0.5 -> 1.0"]
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="ds.json: the top level must be an object"):
        apply_overrides({}, str(f))


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pipeline_model_parallel_size=2"], "parallel.pipeline_model_parallel_size=1"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not one of 1, 2, 3"),
    (["parallel.zero_stage=2", "parallel.offload_params=cpu"], "needs parallel.zero_stage=3"),
    (["train.precision=fp8"], "train.precision=fp8 needs parallel.engine=megatron"),
    (["checkpoint.async_save=true"], "checkpoint.async_save=true needs parallel.engine=megatron"),
    (["parallel.deepspeed_config=/nonexistent.json"], "/nonexistent.json: no such file"),
])
def test_unsupported_combinations_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["parallel.engine=deepspeed", *overrides]).validate()


def test_deepspeed_options_need_the_deepspeed_engine():
    with pytest.raises(ConfigError, match=r"parallel\.offload_optimizer only apply to "
                                          r"parallel\.engine=deepspeed"):
        load_config(None, ["parallel.offload_optimizer=cpu"]).validate()
