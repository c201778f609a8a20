"""MLflow tracking: a real `mlflow server` on 127.0.0.1, resume without duplicates, outages."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from conftest import ROOT  # noqa: E402
from megamor.testing.tracking_server import MlflowServer, StallingProxy, free_port  # noqa: E402
from megamor.tracking import NullTracker, Tracker, flatten_config, metric_items, read_unsent  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (starting one costs seconds); a test that stops it restarts it."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _step_metrics(step: int) -> dict:
    # the shape of StepMetrics.reduce's dict (megamor/training/metrics.py)
    return {"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3 * step, "grad_norm": 1.5,
            "tokens_per_s": 1000.0 + step, "router/step2/selected": 40.0 + step,
            "frac/step2": 0.66, "layer_tokens": [64.0, 64.0, 42.0, 21.0]}


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow  # starts an MLflow server
def test_server_resume_and_outage(server, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model:\n  hidden_size: 64\n")
    config = {"model": {"hidden_size": 64, "arch": "mor", "capacity": [1.0, 0.5]},
              "train": {"lr": 3e-3, "train_steps": 10}, "run": {"note": "x" * 800}}

    # --- first attempt: steps 1..5 delivered, then the process "dies" (no finish)
    t1 = Tracker()
    run_id = t1.start(run_dir, config, tracking_uri=server.url, experiment="megamor-test",
                      run_name="first")
    assert run_id and t1.run_id == run_id
    for step in range(1, 6):
        t1.log_metrics(step, _step_metrics(step))
    t1.log_artifact(run_dir / "config.yaml")
    t1.set_tags({"phase": "one"})
    assert t1.flush() is True  # delivered in the background; flush() waits for it
    assert t1.failures == 0 and t1.pending == 0
    assert t1.last_logged_step("loss") == 5

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.run_name == "first"
    assert run.data.params["model.hidden_size"] == "64"
    assert run.data.params["model.capacity"] == "[1.0, 0.5]"
    assert run.data.params["run.note"] == "x" * 500  # truncated
    assert run.data.tags["phase"] == "one"
    assert {"system/cpu_percent", "system/memory_percent", "system/process_rss_gb",
            "layer_tokens/2", "router/step2/selected", "frac/step2"} <= set(run.data.metrics)
    assert "step" not in run.data.metrics
    assert [f.path for f in client.list_artifacts(run_id)] == ["config.yaml"]

    # --- resumed from a checkpoint at step 3: the trainer re-runs and logs steps 4..8
    config["train"]["lr"] = 1e-3
    t2 = Tracker(backoff_initial_s=3600.0)  # no retry inside the outage below unless forced
    assert t2.start(run_dir, config, tracking_uri=server.url, experiment="megamor-test",
                    run_id=run_id) == run_id
    for step in range(4, 9):
        t2.log_metrics(step, _step_metrics(step))
    assert t2.flush() is True
    n_keys = len(metric_items(_step_metrics(4))) + 4  # + 4 system metrics
    assert t2.skipped == 2 * n_keys  # steps 4 and 5 were already in the store
    assert t2.failures == 0
    assert _steps(client, run_id, "loss") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _steps(client, run_id, "system/cpu_percent") == [1, 2, 3, 4, 5, 6, 7, 8]
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.lr"] == "0.003"  # params are immutable ...
    assert run.data.tags["megamor.param_changed.train.lr"] == "0.003 -> 0.001"  # ... change noted
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # --- the server goes down: nothing raises, metrics are buffered, calls stay fast: one
    # failed request (MLflow's own retries off), then none until the backoff has passed or a
    # flush is forced
    server.stop()
    for step in range(9, 12):
        t2.log_metrics(step, _step_metrics(step))
    (run_dir / "late.txt").write_text("written during the outage")
    t2.log_artifact(run_dir / "late.txt", artifact_path="extra")
    deadline = time.monotonic() + 60
    while t2.failures < 1 and time.monotonic() < deadline:  # the sender's first try
        time.sleep(0.05)
    time.sleep(0.5)
    assert t2.failures == 1
    assert t2.backlog == t2.pending  # in a failure burst: the console line reports it
    assert t2.flush(force=True) is False
    assert t2.failures == 2
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
    assert t2.pending == 3 * n_keys

    # --- back up: the buffered steps arrive exactly once
    server.start()
    assert t2.flush(force=True) is True
    report = t2.finish("FINISHED")
    assert report["lost_metrics"] == 0 and report["lost_artifacts"] == 0 and report["terminated"]
    assert report["failures"] == t2.failures > 0
    assert _steps(client, run_id, "loss") == list(range(1, 12))
    assert _steps(client, run_id, "layer_tokens/3") == list(range(1, 12))
    hist = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert hist[10] == pytest.approx(4.0)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["config.yaml", "extra"]
    assert [f.path for f in client.list_artifacts(run_id, "extra")] == ["extra/late.txt"]
    assert not (run_dir / "mlflow-unsent.jsonl").exists()


def test_default_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    t = Tracker(system_metrics=False)
    run_id = t.start(run_dir, {"model": {"num_layers": 8}}, experiment="local", run_name="r")
    assert t.tracking_uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    for step in (1, 2, 3):
        t.log_metrics(step, {"loss": float(step)})
    t.log_metrics(2, {"loss": 9.0})  # not increasing for this key: dropped
    (run_dir / "metrics.jsonl").write_text("{}\n")
    t.log_artifact(run_dir / "metrics.jsonl")
    report = t.finish("KILLED")
    assert report["skipped"] == 1 and report["lost_metrics"] == 0
    client = MlflowClient(t.tracking_uri)
    assert _steps(client, run_id, "loss") == [1, 2, 3]
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.params == {"model.num_layers": "8"}
    assert (run_dir / "mlruns-artifacts").is_dir()
    assert list((run_dir / "mlruns-artifacts").rglob("metrics.jsonl"))
    assert t.last_logged_step() == 3


def test_unreachable_store_reports_losses(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    t = Tracker(buffer_size=4, system_metrics=False, finish_attempts=1, backoff_initial_s=3600.0)
    assert t.start(tmp_path, {"a": {"b": 1}}, tracking_uri=url) is None  # does not raise
    for step in range(1, 4):
        t.log_metrics(step, {"loss": 1.0, "lr": 0.1})  # 6 metrics into a buffer of 4
    report = t.finish("FAILED")
    # One failed request at start and one at finish; none while backing off, none retried by
    # MLflow's client (which would block for minutes per call).
    assert t.failures == 2 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
    assert report["lost_metrics"] == 6 and report["run_id"] is None and not report["terminated"]
    unsent = list(read_unsent(tmp_path / "mlflow-unsent.jsonl"))
    assert [(u["key"], u["step"]) for u in unsent] == [("loss", 2), ("lr", 2), ("loss", 3), ("lr", 3)]


def test_stalled_server_at_start_loses_nothing(tmp_path, monkeypatch):
    """A tracking server that accepts connections and never answers (stalled from the first
    request): `start` gives up after one request timeout, steps are logged without waiting,
    and `finish` returns within its bound with every metric in the unsent file."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    proxy = StallingProxy(None)
    proxy.stall(float("inf"))
    try:
        t = Tracker(request_timeout_s=1, finish_timeout_s=1.0, system_metrics=False,
                    backoff_initial_s=3600.0)
        assert t.start(tmp_path, {"a": {"b": 1}}, tracking_uri=proxy.url) is None
        assert proxy.held == 1 and t.failures == 1  # the run's creation timed out
        for step in range(1, 21):
            t.log_metrics(step, {"loss": 1.0 / step, "lr": 0.1})
        assert t.pending == t.backlog == 40  # a failure burst: the console line says so
        report = t.finish("FINISHED")  # a forced attempt, held too: given up after 1 s
        assert proxy.stalled and proxy.held == 2 and proxy.answered_in_stall == 0
        assert report["lost_metrics"] == 40 and report["run_id"] is None
        unsent = list(read_unsent(tmp_path / "mlflow-unsent.jsonl"))
        assert [(u["key"], u["step"]) for u in unsent] == [
            (k, s) for s in range(1, 21) for k in ("loss", "lr")]
    finally:
        proxy.close()


@pytest.mark.slow  # uses the MLflow server; the stall itself takes 30 s (no CPU)
def test_stalled_server_does_not_stall_steps(server, tmp_path):
    """The tracking server stalls for 30 s in the middle of a run (every request held, then
    answered late). A step loop that logs through two trackers, as the trainer logs, goes on
    meanwhile: all its steps are logged while the server is still stalled, though each
    tracker's sender had a request held (a step that sent itself would have waited in it).
    Nothing is lost: tracker `a` delivers every step once the stall ends (exactly once, each);
    tracker `b` finishes during the stall, within its bound, with every step in its unsent file."""
    if server.proc is None:
        server.start()
    proxy = StallingProxy(server.url)
    try:
        a = Tracker(finish_timeout_s=90.0)
        b = Tracker(finish_timeout_s=2.0)
        config = {"train": {"lr": 1e-3}}
        run_a = a.start(tmp_path / "a", config, tracking_uri=proxy.url, experiment="stall")
        run_b = b.start(tmp_path / "b", config, tracking_uri=proxy.url, experiment="stall")
        assert run_a and run_b and a.flush() and b.flush()
        proxy.stall(30.0)
        steps, logged_in_stall = 40, []
        for step in range(1, steps + 1):
            time.sleep(0.02)  # the step's compute
            a.log_metrics(step, _step_metrics(step))
            b.log_metrics(step, _step_metrics(step))
            logged_in_stall.append(proxy.stalled)
            if step == 1:  # the senders' first requests are held before the loop goes on
                deadline = time.monotonic() + 20
                while proxy.held < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert all(logged_in_stall) and proxy.held >= 2 and proxy.answered_in_stall == 0
        n_keys = len(metric_items(_step_metrics(1))) + 4  # + 4 system metrics
        assert a.pending == b.pending == steps * n_keys

        report_b = b.finish("FINISHED")  # during the stall: bounded, all in the unsent file
        assert proxy.stalled
        assert report_b["lost_metrics"] == steps * n_keys
        unsent = [(u["key"], u["step"]) for u in read_unsent(tmp_path / "b" / "mlflow-unsent.jsonl")]
        assert sorted(s for k, s in unsent if k == "loss") == list(range(1, steps + 1))
        assert len(unsent) == len(set(unsent)) == steps * n_keys

        # The stall ends: `a`'s sender delivers the backlog by itself (its retries)
        assert proxy.released.wait(60)
        deadline = time.monotonic() + 90
        while a.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.pending == 0 and a.backlog == 0
        report_a = a.finish("FINISHED")
        assert report_a["lost_metrics"] == 0 and report_a["terminated"]
        assert not (tmp_path / "a" / "mlflow-unsent.jsonl").exists()
        client = MlflowClient(server.url)
        assert _steps(client, run_a, "loss") == list(range(1, steps + 1))
        assert _steps(client, run_a, "layer_tokens/3") == list(range(1, steps + 1))
        assert client.get_run(run_a).info.status == "FINISHED"
    finally:
        proxy.close()


def test_helpers_and_null_tracker():
    flat = flatten_config({"model": {"arch": "mor", "capacity": None}, "run": {"x": "y" * 600}})
    assert flat == {"model.arch": "mor", "model.capacity": "None", "run.x": "y" * 500}
    items = dict(metric_items({"step": 3, "loss": 1, "ok": True, "name": "x", "v": [1, 2],
                               "bad key!": 2.0}))
    assert items == {"loss": 1.0, "ok": 1.0, "v/0": 1.0, "v/1": 2.0, "bad key_": 2.0}
    n = NullTracker()
    assert n.start(Path("."), {}, None, "e", "r", None) is None
    n.log_metrics(1, {"loss": 1.0})
    n.log_artifact("nowhere")
    n.set_tags({"a": 1})
    assert n.finish("FINISHED")["lost_metrics"] == 0 and n.failures == 0


def _wait_for_step(metrics: Path, step: int, proc, log: Path, timeout: float = 180.0) -> int:
    """Poll the run's metrics.jsonl until it has reached `step`; return the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        try:
            last = json.loads(lines[-1])["step"] if lines else 0
        except ValueError:  # a line being written
            last = 0
        if last >= step:
            return last
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_pretrain_survives_server_outage(server, tmp_path, builtin_root):
    """`megamor pretrain` against a real server that goes down mid-run and comes back: training
    finishes (exit 0), the log says what happened, and every step's metrics end up in MLflow."""
    if server.proc is None:  # an earlier test stopped it and failed before restarting it
        server.start()
    out, log = tmp_path / "run", tmp_path / "train.log"
    steps = 40
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "megamor.cli", "pretrain", "model.preset=tiny",
           "model.seq_length=64", "train.global_batch_size=8", "train.micro_batch_size=8",
           "train.warmup_steps=1", f"train.train_steps={steps}", "train.log_interval=5",
           f"tracking.tracking_uri={server.url}", "tracking.experiment=outage",
           f"data.builtin_root={builtin_root}", f"run.output_dir={out}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    metrics = out / "metrics.jsonl"
    try:
        # The trainer is held (SIGSTOP) while the server stops and restarts, so the outage
        # falls mid-run whatever the speed of this machine.
        _wait_for_step(metrics, 3, proc, log)
        os.kill(proc.pid, signal.SIGSTOP)
        server.stop()
        down_at = _wait_for_step(metrics, 0, proc, log)
        os.kill(proc.pid, signal.SIGCONT)
        up_at = _wait_for_step(metrics, down_at + 6, proc, log)  # steps trained while down
        os.kill(proc.pid, signal.SIGSTOP)
        server.start()
        os.kill(proc.pid, signal.SIGCONT)
        assert up_at < steps
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    text = log.read_text()
    # One warning for the outage, naming the store and what is done about it ...
    assert text.count(f"MLflow store {server.url} unreachable") == 1, text[-4000:]
    assert "buffering metrics and retrying with backoff" in text
    # ... the console lines of the outage show the backlog ...
    assert re.search(r"^step .*\| mlflow \d+ metrics buffered$", text, re.M), text[-4000:]
    # ... and its end: everything delivered, nothing lost.
    assert re.search(r"MLflow store reachable again after \d+ failed attempts; buffered data "
                     r"delivered", text)
    summary = re.search(r"^tracking: (\{.*\})$", text, re.M)
    assert summary and "'lost_metrics': 0" in summary.group(1) and "'lost_artifacts': 0" in summary.group(1)
    assert not (out / "mlflow-unsent.jsonl").exists()

    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(m["data_wait_s"] >= 0 for m in lines)  # the prefetcher's wait, every step
    local = {m["step"]: m["loss"] for m in lines}
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(hist) == list(range(1, steps + 1))  # the outage's steps arrived, once each
    assert all(hist[s] == pytest.approx(local[s], rel=1e-6) for s in hist)
    assert _steps(client, run.info.run_id, "data_wait_s") == list(range(1, steps + 1))
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "depth_maps"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "depth_maps")} == {
        f"depth_maps/step_{steps:08d}.html", f"depth_maps/step_{steps:08d}.png"}
