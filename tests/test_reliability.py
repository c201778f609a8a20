"""Issue 14 (items 2, 4, 5): the LR schedule follows the configuration on resume; everything
checkable is checked before any rank starts (also by the Slurm preflight); an error inside the
ranks reaches the person as one line; the operator's banner, checkpoint and summary lines."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, run_ranks

from megamor.checkpoint import read_tensors
from megamor.data import ensure_builtin_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "model.seq_length=64", "train.global_batch_size=8",
        "train.warmup_steps=1", "train.log_interval=1", "tracking.depth_map_interval=0",
        "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def one_shard_data(tmp_path_factory) -> Path:
    """A prepared dataset (seq 64, the embedded corpus) whose train split is a single shard."""
    return ensure_builtin_dataset(tmp_path_factory.mktemp("one_shard") / "data", 64, 1024,
                                  samples_per_shard=100_000)


# ----------------------------------------------------------------------------- item 4


def test_schedule_lengths_are_validated(capsys):
    rc, out = run_cli(capsys, "config", "validate", "train.train_steps=20")
    assert rc != 0 and "train.warmup_steps=20 must be less than train.train_steps=20" in out
    rc, out = run_cli(capsys, "config", "validate", "train.train_steps=100",
                   "train.decay_fraction=0.9")
    assert rc != 0 and "train.decay_fraction=0.9" in out and "during the warmup" in out
    rc, out = run_cli(capsys, "config", "validate", "train.on_schedule_change=maybe")
    assert rc != 0 and "train.on_schedule_change='maybe'" in out
    # `megamor pretrain` stops before any rank starts, with exit code 2 and one line
    rc, out = run_cli(capsys, "pretrain", "--nproc", "2", "train.train_steps=20")
    assert rc == 2 and out.strip().splitlines() == [
        "megamor: config error: train.warmup_steps=20 must be less than train.train_steps=20 "
        "(the schedule needs steps after the warmup); lower train.warmup_steps or raise "
        "train.train_steps"]


# ----------------------------------------------------------------------------- item 5


def test_inputs_are_checked_before_any_rank_starts(tmp_path, capsys, one_shard_data):
    from megamor.launch.slurm import main as launch_main

    out_dir = f"run.output_dir={tmp_path / 'run'}"

    def pretrain(*over) -> str:
        rc, out = run_cli(capsys, "pretrain", "--nproc", "2", *TINY, out_dir, *over)
        assert rc == 2, out
        lines = out.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out, out
        return lines[0]

    def preflight(*over) -> str:  # the Slurm batch step's check, the same function
        rc = launch_main(["--check", "--world-size", "2", "--", "pretrain", *TINY, out_dir,
                          *over])
        cap = capsys.readouterr()
        assert rc == 2 and "preflight ok" not in cap.out, cap.out + cap.err
        return cap.err.strip()

    nowhere = tmp_path / "nowhere"
    for check in (pretrain, preflight):
        line = check(f"data.path={nowhere}")
        assert f"data error: data.path={nowhere}: {nowhere} does not exist" in line
        assert "tokenizer" not in line
    assert not (tmp_path / "run").exists()  # nothing started, nothing written

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no manifest.json" in pretrain(f"data.path={empty}")
    assert "model.seq_length=64" in pretrain(f"data.path={one_shard_data}", "model.seq_length=32")

    from megamor.tokenizer import train_bpe
    other = train_bpe(["a few words of another corpus"] * 20, 300, tmp_path / "other_tok")
    line = preflight(f"data.path={one_shard_data}", f"data.tokenizer={tmp_path / 'other_tok'}")
    assert "tokenizer fingerprint mismatch" in line and other.fingerprint in line

    truncated = tmp_path / "truncated"
    shutil.copytree(one_shard_data, truncated)
    shard = truncated / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:4096])
    for check in (pretrain, preflight):
        assert f"shard {shard}: size 4096 bytes" in check(f"data.path={truncated}")

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = pretrain(f"data.path={one_shard_data}", f"run.output_dir={blocker / 'run'}")
    assert line.startswith("megamor: output error: run.output_dir=") and "a_file" in line
    rc = launch_main(["--check", "--world-size", "2", "--", "pretrain", *TINY, out_dir,
                      f"data.path={one_shard_data}"])
    assert rc == 0 and "preflight ok" in capsys.readouterr().out


@pytest.mark.slow
def test_error_inside_ranks_is_one_line(tmp_path, one_shard_data):
    """A shard whose bytes changed but not its size passes the pre-start checks; both ranks
    then fail on its checksum: one `megamor: data error:` line, no traceback, exit 1."""
    bad = tmp_path / "bad"
    shutil.copytree(one_shard_data, bad)
    shard = bad / "train" / "shard-000000.tar"
    raw, mid = bytearray(shard.read_bytes()), shard.stat().st_size // 2
    raw[mid:mid + 4] = bytes(b ^ 0xFF for b in raw[mid:mid + 4])
    shard.write_bytes(bytes(raw))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", "2", *TINY,
         "train.train_steps=3", "tracking.enabled=false", f"data.path={bad}",
         f"run.output_dir={run}"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    lines = [l for l in out.splitlines() if l.startswith("megamor: data error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-4000:]
    assert f"shard {shard}: sha256" in lines[0] and "(corrupt)" in lines[0]
    logs = sorted((run / "logs").glob("rank_*.log"))
    assert [p.name for p in logs] == ["rank_0.log", "rank_1.log"]
    for p in logs:  # the full traceback of each rank
        assert "Traceback" in p.read_text() and "DataError" in p.read_text()
    assert str(logs[0].parent) in lines[0]


# ----------------------------------------------------------------------------- item 2


def _wsd_lr(n: float, lr: float, steps: int, gbs: int = 8, warmup: int = 1, frac: float = 0.2):
    """The WSD learning rate after n samples, written out (linear warmup, constant, linear decay
    over the last round(frac x samples) samples to 0)."""
    total, decay = steps * gbs, round(frac * steps * gbs)
    if n <= warmup * gbs:
        return lr * n / (warmup * gbs)
    if n <= total - decay:
        return lr
    return lr * (1 - (n - (total - decay)) / decay) if n <= total else 0.0


@pytest.mark.slow
def test_schedule_follows_the_config_on_resume(tmp_path, builtin_root, capsys):
    """One launch of 2 ranks runs, at TP1 x PP2 x DP1: `long` (9 steps), `short` (6 steps, saved
    at 3 and 6), `extended` (short's step-3 checkpoint resumed with train_steps=9: must equal
    `long` from step 4 on, bitwise); at DP2: `replanned` (step 3 resumed with another lr and
    train_steps, on_schedule_change=replan)."""
    root = tmp_path / "runs"
    step3 = root / "short" / "checkpoints" / "step_00000003"
    runs = {
        "long": ["train.train_steps=9"],
        "short": ["train.train_steps=6", "checkpoint.save_interval=3"],
        "extended": ["train.train_steps=9", f"checkpoint.resume={step3}"],
        "replanned": ["train.train_steps=5", "train.lr=1.5e-3", f"checkpoint.resume={step3}",
                      "train.on_schedule_change=replan", "parallel.pipeline_model_parallel_size=1"],
    }
    result = tmp_path / "result.json"
    proc = run_ranks(2, "train_runs.py", [
        "--root", str(root), "--out", str(result), "--runs", json.dumps(runs), *TINY,
        "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=4",
        "tracking.enabled=false", f"data.builtin_root={builtin_root}"])
    hist = {name: {m["step"]: m for m in h} for name, h in json.loads(result.read_text()).items()}
    text = {part.split("\n", 1)[0].strip(): part for part in proc.stdout.split("=== run ")[1:]}

    # Extending the stable phase: the LR and everything it drives equal a run planned long.
    long, ext = hist["long"], hist["extended"]
    assert sorted(ext) == list(range(4, 10))
    for s in range(4, 10):
        assert ext[s]["lr"] == long[s]["lr"] == pytest.approx(_wsd_lr(s * 8, 3e-3, 9), abs=1e-12)
        assert ext[s]["loss"] == long[s]["loss"] and ext[s]["grad_norm"] == long[s]["grad_norm"]
    assert ext[9]["lr"] == 0.0 and long[7]["lr"] == 3e-3 and long[8]["lr"] < 3e-3
    assert "megamor: schedule extended at step 3: train.train_steps 6 -> 9" in text["extended"]

    # Re-planned: from step 4 the LR is the new schedule's (lr 1.5e-3 over 5 steps).
    rep = hist["replanned"]
    assert sorted(rep) == [4, 5]
    for s in (4, 5):
        assert rep[s]["lr"] == pytest.approx(_wsd_lr(s * 8, 1.5e-3, 5), abs=1e-12)
    assert ("megamor: schedule re-planned at step 3: train.lr 0.003 -> 0.0015, train.train_steps "
            "6 -> 5; the new schedule applies from step 4 on (its LR there is 1.500e-03; the "
            "saved schedule's was 3.000e-03)") in text["replanned"]

    # Refused: `short` decayed at step 6; resuming that checkpoint with train_steps=9 stops before
    # any rank starts, and the message says how (its step-3 checkpoint, or replan).
    rc, out = run_cli(capsys, "pretrain", "--nproc", "2", *TINY, f"data.builtin_root={builtin_root}",
                   "parallel.pipeline_model_parallel_size=2", "train.train_steps=9",
                   f"run.output_dir={root / 'short'}", "--resume", "auto")
    assert rc == 2 and out.count("\n") == 1, out
    assert "megamor: config error: resuming" in out and "train.train_steps 6 -> 9" in out
    assert "(from step 6 on)" in out and f"e.g. {step3}" in out
    assert "train.on_schedule_change=replan" in out and "(train.train_steps=6)" in out

    # Operator output: a banner (the parameter count is the saved model's, and the same at PP2
    # and DP2), a line per checkpoint, a final summary; megatron's expected noise filtered.
    tensors = read_tensors(root / "short" / "checkpoints" / "step_00000006")
    params = sum(v.numel() for k, v in tensors.items() if not k.startswith("optimizer"))
    head = (f"megamor: mor model (expert_choice routing, 3 recursions, 8 unrolled layers): "
            f"{params / 1e3:.2f}K parameters ({params:,})")
    assert head in text["short"] and head in text["replanned"]
    assert "megamor: layout tp1 x pp2 x dp1 = 2 rank(s) (cpu, fp32; engine megatron distributed optimizer)" in text["short"]
    assert "megamor: layout tp1 x pp1 x dp2 = 2 rank(s) (cpu, fp32; engine megatron distributed optimizer)" in text["replanned"]
    assert "512 tokens per step (8 x 64), steps 1-6" in text["short"]
    for step in (3, 6):
        assert (f"megamor: checkpoint step {step} saved: {root / 'short' / 'checkpoints'}"
                f"/step_{step:08d}") in text["short"]
    assert (f"final loss {hist['short'][6]['loss']:.4f}; checkpoint "
            f"{root / 'short' / 'checkpoints' / 'step_00000006'}") in text["short"]
    assert "megamor: finished steps 1-6 in" in text["short"]
    assert "megamor: finished steps 4-9 in" in text["extended"]
    assert "megamor: checkpoint step 5 saved" in text["replanned"]  # a DP2 save ...
    assert "common state dict differs" not in proc.stdout + proc.stderr  # ... without the noise
