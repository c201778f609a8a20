"""Sharded checkpoints through the user's own command (`megamor pretrain`, gloo ranks):
exact resume, resume on other layouts, kill -9 during a save, bad checkpoints. (Signals and
preemption, MLflow continuation across them included: tests/test_preemption.py.)"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megamor.checkpoint import CheckpointError, find_latest, read_tensors, resolve_resume

pytestmark = pytest.mark.slow  # multi-rank training runs, stop/resume, kills

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["model.preset=tiny", "model.seq_length=64", "train.global_batch_size=8",
          "train.warmup_steps=1", "train.log_interval=1", "checkpoint.keep_last=10"]
EC = ["model.arch=mor", "routing.type=expert_choice"]
TC_FREE = ["model.arch=mor", "routing.type=token_choice", "routing.balancing=loss_free",
           "routing.bias_update_rate=0.01"]


def cmd(out: Path, builtin, nproc: int, overrides, resume=None):
    c = [sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", str(nproc),
         *COMMON, f"data.builtin_root={builtin}", f"run.output_dir={out}", *overrides]
    return c + (["--resume", resume] if resume else [])


def pretrain(out: Path, builtin, nproc: int, overrides, resume=None, expect=0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd(out, builtin, nproc, overrides, resume), capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(out: Path) -> dict[int, dict]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), f"duplicated steps in metrics.jsonl: {steps}"
    return {m["step"]: m for m in lines}


def resume_copy(src: Path, dst: Path, step: int) -> None:
    """A run stopped right after saving `step`: its checkpoint and nothing later."""
    ck = dst / "checkpoints"
    ck.mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, ck / name)
    (ck / "latest").write_text(name)


@pytest.mark.parametrize("kind", ["expert_async_save", "token_loss_free"])
def test_stop_resume_equals_uninterrupted(tmp_path, builtin_root, kind):
    over = (EC + ["checkpoint.async_save=true"] if kind.startswith("expert") else TC_FREE) + [
        "train.train_steps=6", "checkpoint.save_interval=3", "train.micro_batch_size=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    pretrain(full, builtin_root, 2, over)
    resume_copy(full, resumed, 3)
    proc = pretrain(resumed, builtin_root, 2, over, resume="auto")
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    a, b = metrics(full), metrics(resumed)
    assert sorted(b) == [4, 5, 6]
    for s in (4, 5, 6):
        assert b[s]["loss"] == a[s]["loss"], (s, a[s]["loss"], b[s]["loss"])  # fp32, bitwise
        assert b[s]["grad_norm"] == a[s]["grad_norm"]
        assert b[s]["lr"] == a[s]["lr"]
    wa = read_tensors(full / "checkpoints" / "step_00000006")
    wb = read_tensors(resumed / "checkpoints" / "step_00000006")
    assert wa.keys() == wb.keys() and any("router" in k for k in wa)
    for k in wa:  # weights, router state (loss-free bias) and optimizer moments
        assert torch.equal(wa[k], wb[k]), k


def test_resume_on_other_layouts(tmp_path, builtin_root):
    over = EC + ["train.train_steps=6", "checkpoint.save_interval=3", "train.micro_batch_size=2"]
    tp2pp2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    full = tmp_path / "tp2pp2"
    pretrain(full, builtin_root, 4, over + tp2pp2)
    ref = metrics(full)
    for name, nproc, layout in [("dp2", 2, []),
                                ("pp2dp2", 4, ["parallel.pipeline_model_parallel_size=2"])]:
        out = tmp_path / name
        resume_copy(full, out, 3)
        pretrain(out, builtin_root, nproc, over + layout, resume="auto")
        got = metrics(out)
        for s in (4, 5, 6):
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
            assert got[s]["layer_tokens"] == ref[s]["layer_tokens"], (name, s)  # same batches


@pytest.mark.parametrize("arch", ["recursive"])
def test_baselines_resume_on_another_layout(tmp_path, builtin_root, arch):
    """The recursive baseline (copies of shared layers on both pipeline stages, no routers); the
    vanilla model's weights reshard in test_hf_export (trained at TP2 x PP2, read in one
    process)."""
    over = [f"model.arch={arch}", "train.train_steps=4", "checkpoint.save_interval=2",
            "train.micro_batch_size=2"]
    full = tmp_path / "tp2pp2"
    pretrain(full, builtin_root, 4, over + ["parallel.tensor_model_parallel_size=2",
                                           "parallel.pipeline_model_parallel_size=2"])
    out = tmp_path / "dp2"
    resume_copy(full, out, 2)
    pretrain(out, builtin_root, 2, over, resume="auto")
    ref, got = metrics(full), metrics(out)
    for s in (3, 4):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s


def test_kill_9_during_save_leaves_previous_checkpoint(tmp_path, builtin_root):
    over = EC + ["train.train_steps=200", "checkpoint.save_interval=1", "train.micro_batch_size=4"]
    out = tmp_path / "killed"
    ck = out / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd(out, builtin_root, 2, over), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    killed_during_save = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        tmp = list(ck.glob(".tmp.step_*")) if ck.exists() else []
        if tmp and find_latest(ck) is not None:
            for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                p.kill()
            killed_during_save = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_during_save, "no save was caught in progress"
    latest = find_latest(ck)
    assert latest is not None and (latest / "megamor.json").exists()
    # The interrupted save is invisible: resume loads the previous complete checkpoint.
    step = json.loads((latest / "megamor.json").read_text())["step"]
    proc = pretrain(out, builtin_root, 2, EC + ["train.train_steps=" + str(step + 1),
                                                "train.micro_batch_size=4",
                                                "train.on_schedule_change=replan"], resume="auto")
    assert f"at step {step}" in proc.stdout


def test_bad_checkpoints_fail_clearly(tmp_path, builtin_root):
    over = EC + ["train.train_steps=2", "train.micro_batch_size=4"]
    good = tmp_path / "good"
    pretrain(good, builtin_root, 1, over)
    ckpt = good / "checkpoints" / "step_00000002"
    # A good checkpoint loads in one process for inference tools: the depth map command.
    dm = subprocess.run([sys.executable, "-m", "megamor.cli", "depth-map", str(good / "checkpoints"),
                         "--text", "The for statement iterates over a sequence.", "--out",
                         str(tmp_path / "dm"), "--width", "640"], capture_output=True, text=True)
    assert dm.returncode == 0, dm.stderr[-3000:]
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "dm" / "depth_map.png")
    assert img.shape[1] == 640 and img.std() > 0.01
    assert "mean depth" in dm.stdout and (tmp_path / "dm" / "depth_map.html").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(ckpt, incomplete)
    (incomplete / "megamor.json").unlink()
    with pytest.raises(CheckpointError, match="megamor.json is missing"):
        resolve_resume(str(incomplete), tmp_path)
    # Shape mismatch and corruption go through the command: one clear line, non-zero exit.
    p = pretrain(tmp_path / "shape", builtin_root, 1, over + ["model.hidden_size=96"],
                 resume=str(ckpt), expect=2)
    assert "hidden_size: checkpoint 64, config 96" in p.stderr and str(ckpt) in p.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    shard = sorted(corrupt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    p = pretrain(tmp_path / "c", builtin_root, 1, over, resume=str(corrupt), expect=2)
    assert f"checkpoint error: {shard}: truncated shard file" in p.stderr
    shard.unlink()
    p = pretrain(tmp_path / "c", builtin_root, 1, over, resume=str(corrupt), expect=2)
    assert f"checkpoint error: {shard}: shard file missing" in p.stderr
