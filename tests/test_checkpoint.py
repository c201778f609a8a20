"""Sharded checkpoints through the user's own command (`megamor pretrain`, gloo ranks):
exact resume, resume on other layouts, kill -9 during a save, bad checkpoints. (Signals and
preemption, MLflow continuation across them included: tests/test_preemption.py.)"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import run_cli
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


@pytest.mark.parametrize("kind", ["expert_async_save", "token_loss_free_vp"])
def test_stop_resume_equals_uninterrupted(tmp_path, builtin_root, kind):
    # Expert-choice at DP 2 with asynchronous saves; token-choice with loss-free balancing (router
    # buffers in the checkpoint) on a virtual pipeline, PP 2 x VP 2 with the default interleaved
    # cut (chunks sharing layers: one module, one optimizer state, saved once).
    vp = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_size=2"]
    over = (EC + ["checkpoint.async_save=true"] if kind.startswith("expert") else TC_FREE + vp) + [
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
    # ... and onto a virtual pipeline (two chunks per stage, one empty, another cut) with
    # sequence parallelism: the folded wire at s / tp rows.
    tp2vp2 = tp2pp2 + ["parallel.virtual_pipeline_size=2", "parallel.pipeline_layers=[2,0,3,3]",
                       "parallel.sequence_parallel=true"]
    for name, nproc, layout in [("dp2", 2, []), ("tp2pp2vp2sp", 4, tp2vp2)]:
        out = tmp_path / name
        resume_copy(full, out, 3)
        pretrain(out, builtin_root, nproc, over + layout, resume="auto")
        got = metrics(out)
        for s in (4, 5, 6):
            assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), (name, s)
            assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), (name, s)
            assert got[s]["layer_tokens"] == ref[s]["layer_tokens"], (name, s)  # same batches
    # The interleaved run's checkpoint holds the weights the contiguous run trained.
    wa = read_tensors(full / "checkpoints" / "step_00000006")
    wb = read_tensors(tmp_path / "tp2pp2vp2sp" / "checkpoints" / "step_00000006")
    weights = [k for k in wa if not k.startswith("optimizer")]
    assert weights and set(weights) <= set(wb) and any("router" in k for k in weights)
    for k in weights:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


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
                         str(tmp_path / "dm"), "--width", "640", "--routing", "topk"],
                        capture_output=True, text=True)
    assert dm.returncode == 0, dm.stderr[-3000:]
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "dm" / "depth_map.png")
    assert img.shape[1] == 640 and img.std() > 0.01
    assert "mean depth" in dm.stdout and "(topk routing)" in dm.stdout
    # Issue 19 item 7: --routing topk routes as in training: capacities 1, 2/3, 1/3 of the text's
    # tokens reach steps 1, 2, 3; the page and the PNG carry a title; no depth-0 legend entry.
    import re
    page = (tmp_path / "dm" / "depth_map.html").read_text()
    depths = [int(d) for d in re.findall(r'title="depth (\d)"', page)]
    n = len(depths)
    assert [sum(d >= r for d in depths) for r in (1, 2, 3)] == [n, 2 * n // 3, n // 3]
    assert "top-k (training) routing" in page and ">depth 0</span>" not in page
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
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    p = pretrain(tmp_path / "c", builtin_root, 1, over, resume=str(corrupt), expect=2)
    assert (f"checkpoint error: {shard}: size {full // 2} bytes, {corrupt / 'megamor.json'} lists "
            f"{full} (truncated or rewritten); no earlier checkpoint of this run is intact") \
        in p.stderr
    shard.unlink()
    p = pretrain(tmp_path / "c", builtin_root, 1, over, resume=str(corrupt), expect=2)
    assert f"checkpoint error: {shard}: file missing (listed in {corrupt / 'megamor.json'})" in p.stderr


# ----------------------------------------------------------------------------- issue 19
# One 2-rank launch (tests/scenarios/checkpoint_faults.py) runs every case below that needs
# ranks; the rest is this process: the pre-start checks, `megamor checkpoint verify`, the pieces.


def _small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only; None where it cannot be mounted)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return path if proc.returncode == 0 else None


def _umount(path):
    if path is not None:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def faults(tmp_path_factory, builtin_root):
    base = tmp_path_factory.mktemp("faults")
    tmpfs = _small_tmpfs(base / "tmpfs", "6m")  # one tiny checkpoint fits, two do not
    try:
        from conftest import run_ranks
        run_ranks(2, "checkpoint_faults.py", [
            "--root", str(base / "runs"), "--out", str(base / "out.json"),
            *(["--tmpfs", str(tmpfs)] if tmpfs else []), f"data.builtin_root={builtin_root}"])
    finally:
        _umount(tmpfs)
    return base / "runs", json.loads((base / "out.json").read_text())


def _steps(res) -> dict:
    return {m["step"]: m for m in res["history"]}


def test_a_fresh_run_never_writes_into_another_runs_checkpoints(faults, builtin_root, capsys):
    """Issue 19 item 1: before, the fresh run's own checkpoint was rotated away, `latest` named a
    deleted directory and metrics.jsonl was overwritten."""
    root, out = faults
    ck = root / "base" / "checkpoints"
    assert out["base_listing"] == ["latest", "step_00000004", "step_00000006"]  # rotated: 2
    err = out["refused"]["error"]
    assert err["type"] == "PreflightError" and "holds checkpoints of another run" in err["message"]
    assert out["base_listing_after"] == out["base_listing"]  # nothing deleted
    # The user's command refuses before any rank starts: one line naming the three ways out.
    rc, text = run_cli(capsys, "pretrain", "--nproc", "2", *COMMON, f"data.builtin_root={builtin_root}",
                    f"run.output_dir={root / 'base'}", "train.train_steps=4")
    assert rc == 2 and text.count("\n") == 1, text
    assert text.startswith(f"megamor: output error: {ck} holds checkpoints of another run")
    for way in ("--resume auto", "run.output_dir", "checkpoint.new_lineage=true"):
        assert way in text
    rc, text = run_cli(capsys, "config", "validate", "checkpoint.new_lineage=true",
                    "checkpoint.resume=auto")
    assert rc != 0 and "cannot be combined with checkpoint.resume=auto" in text
    # checkpoint.new_lineage=true moved them aside, intact; the new run rotates only its own.
    listing = out["new_lineage_listing"]
    assert listing["root"] == ["latest", "previous", "step_00000002"]
    assert [p.split("/", 1)[1] for p in listing["previous"]] == [
        "latest", "step_00000004", "step_00000006"]
    from megamor.checkpoint import verify_checkpoint
    moved = next((root / "new_lineage" / "checkpoints" / "previous").iterdir())
    assert verify_checkpoint(moved / "step_00000006").endswith("every xxh3_128 checksum matches")
    assert (root / "new_lineage" / "checkpoints" / "latest").read_text() == "step_00000002"


def test_a_corrupt_checkpoint_is_skipped_or_refused(faults, capsys):
    """Issue 19 item 2: 4 KB flipped in the newest shard (same size) used to load silently."""
    root, out = faults
    bad = root / "corrupt_explicit" / "checkpoints" / "step_00000006"
    err = out["corrupt_explicit"]["error"]
    assert err["type"] == "CheckpointError"
    assert err["message"].startswith(f"{bad / '__0_0.distcp'}: xxh3_128 checksum differs")
    assert f"--resume {bad.parent / 'step_00000004'}" in err["message"]
    # --resume auto skips it and resumes from step 4 exactly (constant LR: same losses as base)
    auto = out["corrupt_auto"]
    assert auto["resumed_from"].endswith("step_00000004")
    got, want = _steps(auto), _steps(out["base"])
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s]["loss"] for s in (5, 6)] == [want[s]["loss"] for s in (5, 6)]
    # `megamor checkpoint verify`: the same verdict on demand, one line per checkpoint.
    rc, text = run_cli(capsys, "checkpoint", "verify", str(bad.parent))
    assert rc == 1, text
    assert f"{bad}: FAILED: {bad / '__0_0.distcp'}: xxh3_128 checksum differs" in text
    assert f"{bad.parent / 'step_00000004'}: ok: " in text
    assert run_cli(capsys, "checkpoint", "verify", str(bad.parent / "step_00000004"))[0] == 0


def test_non_finite_steps_never_reach_the_weights(faults):
    """Issue 19 item 3: a NaN loss was applied (the weights became NaN) and the run went on, or
    stopped with a traceback; a loss far above its average went unreported."""
    root, out = faults
    res = out["nonfinite"]
    h, w = _steps(res), res["weights"]  # w[k]: the weights' sum after step k
    assert [s for s in h if h[s].get("nonfinite")] == [3, 4]
    assert w[2] == w[3] == w[4] and w[4] != w[5]  # skipped steps left the weights as they were
    assert h[5]["skipped_steps"] == 2 and all(math.isfinite(h[s]["loss"]) for s in range(5, 15))
    assert h[14]["loss_spike"] > 5 and "loss_spike" not in h[13]  # x10 at step 14, reported
    rows = [json.loads(l) for l in (root / "nonfinite" / "metrics.jsonl").read_text().splitlines()]
    assert rows[13]["loss_spike"] == h[14]["loss_spike"]
    from mlflow.tracking import MlflowClient  # the spike and the skipped steps reach MLflow too
    client = MlflowClient(f"sqlite:///{root / 'nonfinite' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["megamor.loss_spike"].startswith("step 14: loss ")
    assert run.data.metrics["loss_spike"] == pytest.approx(h[14]["loss_spike"])
    assert run.data.metrics["skipped_steps"] == 2
    err = out["nonfinite_stop"]["error"]
    assert err["type"] == "NonFiniteError" and all(e == err for e in out["nonfinite_stop"]["errors"])
    assert err["message"].startswith("3 step(s) in a row with a non-finite loss or gradient "
                                     "(steps 2-4;")
    assert "train.max_nonfinite_in_row=3" in err["message"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_fails_the_save_cleanly_at_every_rank(faults, mode):
    """Issue 19 item 4 (ranks): the second save does not fit on a small tmpfs."""
    root, out = faults
    res = out.get(f"disk_full_{mode}")
    if res is None:
        pytest.skip("needs root to mount a tmpfs")
    errs = res["errors"]
    assert [e["type"] for e in errs] == ["CheckpointSaveError"] * 2
    assert "No space left on device" in errs[0]["message"] and "step_00000004 failed" in errs[0]["message"]
    assert "the previous checkpoint" in errs[0]["message"] and "is intact" in errs[0]["message"]
    assert [e["consequence"] for e in errs] == [False, True]  # rank 1 learned it from rank 0
    assert res["listing"] == ["latest", "step_00000002"]  # no .tmp left
    assert res["previous"].endswith("every xxh3_128 checksum matches")


def test_a_full_disk_through_the_command_is_one_line(tmp_path, builtin_root, capsys):
    """Issue 19 item 4 (the user's command): before, 76 lines of tracebacks from both ranks, a
    `.tmp.step_*` left, and a rerun on the full disk trained six steps before failing again."""
    tmpfs = _small_tmpfs(tmp_path / "tmpfs", "6m")
    if tmpfs is None:
        pytest.skip("needs root to mount a tmpfs")
    try:
        run = [*COMMON, f"data.builtin_root={builtin_root}", f"run.output_dir={tmp_path / 'run'}",
               f"checkpoint.dir={tmpfs / 'ck'}", "train.train_steps=4", "checkpoint.save_interval=2",
               "tracking.enabled=false", "tracking.depth_map_interval=0", "train.micro_batch_size=4"]
        proc = subprocess.run([sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", "2", *run],
                              capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
        errors = [l for l in proc.stderr.splitlines() if not l.startswith("megamor: warning:")]
        assert len(errors) == 1, proc.stderr
        assert errors[0].startswith("megamor: checkpoint error: saving ") and \
            "No space left on device" in errors[0]
        assert "room for one more checkpoint only" in proc.stderr  # the pre-start warning
        assert sorted(p.name for p in (tmpfs / "ck").iterdir()) == ["latest", "step_00000002"]
        assert read_tensors(tmpfs / "ck" / "step_00000002")  # the previous one loads
        # A rerun on the still-full disk is refused before any rank starts.
        rc, text = run_cli(capsys, "pretrain", "--nproc", "2", *run, "--resume", "auto")
        assert rc == 2 and text.count("\n") == 1, text
        assert text.startswith(f"megamor: output error: {tmpfs / 'ck'}: ") and "free" in text
    finally:
        _umount(tmpfs)


def test_rotation_keeps_the_runs_newest_and_just_saved_checkpoints(tmp_path):
    from megamor.lineage import open_metrics, to_delete

    root = tmp_path / "ck"

    def ckpt(step, lineage):
        p = root / f"step_{step:08d}"
        p.mkdir(parents=True)
        (p / "megamor.json").write_text(json.dumps({"step": step, "lineage": lineage}))
        return p

    mine = {s: ckpt(s, "a") for s in (10, 20, 30, 40)}
    other = ckpt(50, "b")
    legacy = ckpt(60, "")
    # keep_last=2 of its own (30, 40), never another run's or a legacy one
    assert to_delete(root, "a", 2, 0, mine[40]) == [mine[10], mine[20]]
    # resumed from 20 and saved 25 (a roll-back): the just-saved one is kept whatever its step
    just = ckpt(25, "a")
    assert just not in to_delete(root, "a", 1, 0, just) and mine[40] not in to_delete(root, "a", 1, 0, just)
    assert to_delete(root, "a", 1, 20, just) == [mine[10], mine[30]]  # keep_every=20 keeps 20, 40
    assert other.exists() and legacy.exists() and to_delete(root, "", 1, 0, legacy) == []

    # metrics.jsonl is never overwritten: moved aside on a fresh start, later lines kept apart
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3)))
    open_metrics(m, resumed_step=2).close()
    assert [json.loads(l)["step"] for l in m.read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "metrics.replaced.jsonl").read_text())["step"] == 3
    open_metrics(m, resumed_step=None).close()
    assert m.read_text() == "" and len(list(tmp_path.glob("metrics.2*.jsonl"))) == 1


def test_pieces_of_the_guarantees():
    """The non-finite check on bf16 and fp32 gradients; the save error names a full disk;
    one Ctrl-C forwarded twice is one interrupt."""
    from megamor.checkpoint import save_failure_cause
    from megamor.lifecycle import SECOND_INTERRUPT_AFTER_S, InterruptCounter
    from megamor.step_health import local_nonfinite
    from torch.distributed.checkpoint.api import CheckpointException

    for dtype in (torch.float32, torch.bfloat16):
        g = torch.ones(1000, dtype=dtype)
        assert not local_nonfinite([torch.tensor(2.5)], [g, None])
        g[17] = float("inf")
        assert local_nonfinite([], [g])
        assert local_nonfinite([torch.tensor(float("nan"))], [torch.ones(3, dtype=dtype)])
    full = CheckpointException("write", {0: (OSError(28, "No space left on device"), None)})
    assert save_failure_cause(full, Path("/"))[0].startswith("No space left on device")
    other_rank = CheckpointException("write", {})  # what the non-coordinator ranks get
    assert save_failure_cause(other_rank, Path("/"))[1] is True
    c = InterruptCounter()
    assert not c.second(now=100.0) and not c.second(now=100.000004)  # one keypress, twice
    assert c.second(now=100.0 + SECOND_INTERRUPT_AFTER_S)


def test_pick_checkpoint_falls_back_newest_first_and_says_when_none_is_intact(tmp_path):
    """The one selection rule of the pre-start checks and the ranks (`problem` differs: sizes
    there, checksums here): `auto` skips bad checkpoints newest first and stops when none is
    intact; an explicit bad checkpoint stops at once; nothing saved yet is a fresh start."""
    from megamor.checkpoint import CheckpointError, pick_checkpoint

    root = tmp_path / "ck"
    for step in (10, 20, 30):
        (root / f"step_{step:08d}").mkdir(parents=True)
    bad = {"step_00000030": "torn", "step_00000020": "checksum differs"}
    skipped = []
    got = pick_checkpoint("auto", root, lambda p: bad.get(p.name),
                          lambda p, why: skipped.append((p.name, why)))
    assert got == root / "step_00000010"
    assert skipped == [("step_00000030", "torn"), ("step_00000020", "checksum differs")]
    with pytest.raises(CheckpointError, match="checksum differs; "):
        pick_checkpoint(str(root / "step_00000020"), root, lambda p: bad.get(p.name))
    bad["step_00000010"] = "a file is missing"
    with pytest.raises(CheckpointError, match=r"no intact checkpoint under .*ck \(the newest: "
                                              r"torn\).*checkpoint.new_lineage=true"):
        pick_checkpoint("auto", root, lambda p: bad.get(p.name))
    assert pick_checkpoint("auto", tmp_path / "nothing_yet", lambda p: "never asked") is None
