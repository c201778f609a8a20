"""Preemption and process lifecycle through the user's own command (`megamor pretrain --nproc 2`):
a stop signal after periodic checkpoints (sync and async, SIGTERM and Ctrl-C's SIGINT) saves,
exits 75 with one line and resumes to the uninterrupted run's losses; kill -9 of the launcher's
process group leaves no rank or checkpoint writer running; one rank killed ends the job.
Stalls (megamor/watchdog.py): a slowed rank is reported as the straggler, and neither a rank
frozen for less than run.hang_timeout nor a checkpoint save longer than it is a hang (the run
ends with the uninterrupted losses); a rank frozen for longer ends the job with one line, the
stacks and exit 76. Slurm's side (USR1 -> requeue, a stall -> requeue) is in tests/test_slurm.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import freeze_in_data

pytestmark = pytest.mark.slow  # 2-rank training runs stopped by signals and kills

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
RUN = ["model.preset=tiny", "model.seq_length=64", "train.global_batch_size=8",
       "train.micro_batch_size=4", "train.warmup_steps=1", "train.log_interval=1",
       "checkpoint.keep_last=10", "tracking.enabled=false", "tracking.depth_map_interval=0",
       f"train.train_steps={STEPS}", "checkpoint.save_interval=3"]
NOISE = ("Traceback", "FAILED", "Error", "KeyboardInterrupt", "BrokenPipe", "torch.distributed")
HANG = 10  # run.hang_timeout (s) of the stall tests


def launch(out: Path, builtin, extra=(), resume=False, env=None, wrapper=(), **popen) -> subprocess.Popen:
    cmd = [*wrapper, sys.executable, "-m", "megamor.cli", "pretrain", "--nproc", "2", *RUN,
           f"data.builtin_root={builtin}", f"run.output_dir={out}", *extra]
    cmd += ["--resume", "auto"] if resume else []
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            **popen)


def read_until(proc: subprocess.Popen, text: str, timeout: float = 300) -> list[str]:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
        assert time.time() < deadline, f"no {text!r} in time:\n{''.join(seen[-30:])}"
    raise AssertionError(f"exited ({proc.wait()}) before {text!r}:\n{''.join(seen[-40:])}")


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows}


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def stop_with(proc: subprocess.Popen, sig: int, after_step: int, out: Path) -> tuple[str, int]:
    """Send `sig` once step `after_step` is logged (a periodic checkpoint is complete, or in
    flight when asynchronous): SIGINT to the launcher's process group, as Ctrl-C in a terminal
    does, other signals to the launcher. Check the clean, one-line stop; return the output
    after the signal and the step that was saved (at least one step later: how many depends on
    how fast this test reads the log)."""
    read_until(proc, f"step {after_step:>5} |")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=300)
    name = signal.Signals(sig).name
    assert proc.returncode == 75, rest
    assert not [l for l in rest.splitlines() if any(n in l for n in NOISE)], rest
    said = [l for l in rest.splitlines() if "exiting with 75" in l]
    assert len(said) == 1 and said[0].startswith(f"{name}: saved "), rest
    marker = json.loads((out / "preempted.json").read_text())
    k = marker["step"]
    assert after_step < k < STEPS and marker["signal"] == name, marker
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == f"step_{k:08d}" == Path(marker["checkpoint"]).name
    assert (ck / f"step_{k:08d}" / "megamor.json").is_file()
    assert not list(ck.glob(".tmp.*")), list(ck.iterdir())  # nothing half-written left
    return rest, k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, builtin_root):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(out, builtin_root)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    return losses(out)


def test_signal_after_periodic_saves_resumes_to_same_loss(reference, tmp_path, builtin_root):
    """SIGTERM after a sync periodic save, then, resumed with async saves, Ctrl-C (SIGINT, under
    `timeout --foreground`, which delivers it twice) while a periodic save may still be writing;
    the third run finishes with the reference's losses.
    (Before the fix: BrokenPipeError in megatron's writer, a leftover .tmp.step_*, exit 1; and
    Ctrl-C printed four tracebacks.)"""
    out = tmp_path / "run"
    mlflow = ["tracking.enabled=true"]
    _, first = stop_with(launch(out, builtin_root, mlflow), signal.SIGTERM, 4, out)
    # Ctrl-C through a wrapper that forwards it to the process group the terminal signalled
    # (timeout --foreground): the launcher gets SIGINT twice, microseconds apart, and must take
    # it as one interrupt (issue 19 item 5; before: "interrupted twice", exit 130, no checkpoint).
    proc = launch(out, builtin_root, mlflow + ["checkpoint.async_save=true"], resume=True,
                  wrapper=["timeout", "--foreground", "900"], start_new_session=True)
    stop_with(proc, signal.SIGINT, first + 2, out)
    proc = launch(out, builtin_root, mlflow, resume=True)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and not (out / "preempted.json").exists(), text[-4000:]
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == reference  # fp32 on CPU: exact
    # The resumed runs continued the same MLflow run (its id travels in the checkpoint).
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(h.step for h in hist) == list(range(1, STEPS + 1))
    assert {h.step: h.value for h in hist} == pytest.approx(reference)


def test_kill_9_of_launcher_group_leaves_no_process(tmp_path, builtin_root):
    """kill -9 of the launcher's process group (a terminal closing, a batch system cleaning
    up): torchrun, the ranks and their checkpoint writers all end within seconds."""
    out = tmp_path / "run"
    proc = launch(out, builtin_root, ["checkpoint.save_interval=1", "train.train_steps=1000"],
                  start_new_session=True)
    read_until(proc, "step     2 |")  # a save happened: the writer's helper process exists
    procs = tree(proc)
    ranks = [p for p in procs if "megamor.cli" in " ".join(p.cmdline()) and p.ppid() != proc.pid]
    assert len(ranks) >= 2, [p.cmdline() for p in procs]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    alive = wait_gone(procs, timeout=20)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    time.sleep(2)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == steps  # nobody trains on


def test_one_rank_killed_ends_the_job(tmp_path, builtin_root):
    out = tmp_path / "run"
    proc = launch(out, builtin_root, ["train.train_steps=1000"])
    read_until(proc, "step     2 |")
    procs = tree(proc)
    ranks = psutil.Process(proc.pid).children()[0].children()  # torchrun's children
    ranks[-1].kill()
    text, _ = proc.communicate(timeout=300)  # a hang guard, not a speed bound
    assert proc.returncode not in (0, 75), (proc.returncode, text)
    assert not wait_gone(procs, timeout=10)
    # The job ended because of the kill, not by training on to its last step.
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) < 1000


# ----------------------------------------------------------------------------- stalls


def test_straggler_short_freeze_and_slow_save_are_not_hangs(reference, tmp_path, builtin_root):
    """Rank 1's data path is slowed (0.3 s a step): every log line and MLflow name it the
    slowest rank, with a warning after 3 windows. Rank 0 spends HANG + 2 s in the checkpoint
    save of step 6, and rank 1 is frozen (SIGSTOP) for HANG / 2 s while the other waits in the
    gradient sync: neither is a hang, and the run ends with the uninterrupted run's losses."""
    out, progress = tmp_path / "run", tmp_path / "progress"
    proc = launch(out, builtin_root, [f"run.hang_timeout={HANG}", "tracking.enabled=true"],
                  env={"MEGAMOR_PROGRESS_DIR": str(progress),
                       "MEGAMOR_TEST_DELAY": f"data@1=0.3,checkpoint@0#6={HANG + 2}"})
    frozen = freeze_in_data(progress, 1, 9)
    time.sleep(HANG / 2)
    os.kill(frozen["pid"], signal.SIGCONT)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    assert "megamor: hang:" not in text and not (out / "hung.json").exists(), text[-3000:]
    assert losses(out) == reference  # fp32 on CPU: exact
    assert f"megamor: hang watchdog: limit {HANG} s" in text
    saved = [l for l in text.splitlines() if "checkpoint step 6 saved" in l]
    assert len(saved) == 1 and float(saved[0].rsplit("(", 1)[1].split()[0]) > HANG, saved

    lines = [l for l in text.splitlines() if l.startswith("step ")]
    slowest = [l.rsplit("| slowest ", 1)[1] for l in lines]
    assert len(slowest) == STEPS and sum(s.startswith("r1 ") for s in slowest) >= STEPS - 2, lines
    warned = [l for l in text.splitlines() if l.startswith("WARNING: straggler:")]
    assert warned and warned[0].startswith("WARNING: straggler: rank 1 (on "), warned
    assert "for 3 logging windows in a row" in warned[0]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    ranks = client.get_metric_history(run.info.run_id, "straggler/rank")
    ratios = client.get_metric_history(run.info.run_id, "straggler/ratio")
    assert sorted(h.step for h in ratios) == list(range(1, STEPS + 1))
    assert sum(h.value == 1 for h in ranks) >= STEPS - 2
    assert max(h.value for h in ratios) > 1.2
    assert run.data.tags["megamor.straggler_warning"].split(": ", 1)[1] == \
        warned[0].removeprefix("WARNING: ")


def test_frozen_rank_ends_the_job_with_one_line_and_stacks(tmp_path, builtin_root):
    """Rank 1 frozen (SIGSTOP) in its data path for good: within HANG + 60 s the launcher prints
    one line naming it, its phase and step, and rank 0 waiting in the gradient sync; every
    rank's stacks are in <run>/logs/hang-*/; hung.json says the same; exit 76; no process
    left."""
    out, progress = tmp_path / "run", tmp_path / "progress"
    proc = launch(out, builtin_root, [f"run.hang_timeout={HANG}"],
                  env={"MEGAMOR_PROGRESS_DIR": str(progress), "MEGAMOR_TEST_DELAY": "data@1=0.3"})
    frozen = freeze_in_data(progress, 1, 4)
    t0, procs = time.time(), tree(proc)
    text, _ = proc.communicate(timeout=HANG + 120)
    took = time.time() - t0
    assert proc.returncode == 76 and HANG <= took < HANG + 60, (proc.returncode, took, text[-3000:])
    (line,) = [l for l in text.splitlines() if l.startswith("megamor: hang:")]
    step, pid = frozen["step"], frozen["pid"]
    assert (f"(limit {HANG} s, run.hang_timeout): did not reach the collective: rank 1 in data "
            f"(loading its batch) at step {step} (pid {pid} on ") in line, line
    assert "stopped (SIGSTOP or a debugger)); rank 0 waits in gradient sync (all-reduce) at " \
           f"step {step}; stacks in {out}/logs/hang-" in line, line
    assert line.endswith("exiting with 76 (retryable: resume with --resume auto)")
    assert not [l for l in text.splitlines() if any(n in l for n in NOISE)], text[-3000:]
    marker = json.loads((out / "hung.json").read_text())
    assert marker["laggards"] == [1] and marker["line"] == line
    assert marker["where"]["1"] == {"step": step, "phase": "data", "state": "stopped"}
    assert marker["checkpoint"] == str(out / "checkpoints" / f"step_{3 * ((step - 1) // 3):08d}")
    stacks = Path(marker["stacks"])
    assert f"stacks in {stacks}/" in line
    waiting = (stacks / "rank_0.txt").read_text()
    assert waiting.startswith("rank 0 (pid ") and "gradient sync (all-reduce)" in waiting
    assert "in _finalize_grads" in waiting and "in train_step" in waiting, waiting
    assert "process state stopped" in (stacks / "rank_1.txt").read_text()
    assert json.loads((out / "logs" / "hangs.jsonl").read_text())["line"] == line
    assert not wait_gone(procs, timeout=10)
