"""Hang watchdog and straggler report, without launching ranks (docs/cluster.md, "When a rank
stalls"): the timeouts derived from run.hang_timeout and what a GPU rank's NCCL environment gets;
the stall decision (who did not reach the collective, slow phases, ties, silent nodes); two
node watchers sharing a run directory; stacks from a live process (faulthandler) and the py-spy
call; the straggler windows and their CUDA-event timing (a stand-in records what CUDA is asked).
The launched scenarios are in tests/test_preemption.py (local) and tests/test_slurm.py."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from megamor import node_watcher, parallel, watchdog
from megamor.config import ConfigError, load_config
from megamor.progress import Progress, parse_test_delays, read_record, record_path
from megamor.stragglers import Sections, Stragglers, line_part
from megamor.node_watcher import NodeWatcher
from megamor.watchdog import Timeouts, judge, verdict_line

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- timeouts


def test_timeouts_derive_from_one_setting():
    t = Timeouts(10.0)
    assert (t.collective_s, t.slow_phase_s, t.nccl_heartbeat_s) == (360, 300.0, 420)
    assert t.step_limit(0.2) == 10.0
    auto = Timeouts(None)  # auto: 10 x median step in [300, 1500]; collectives keep 30 minutes
    assert auto.collective_s == 1800 and auto.slow_phase_s == 1740.0
    assert [auto.step_limit(m) for m in (0.2, 60.0, 1000.0)] == [300.0, 600.0, 1500.0]
    assert auto.step_limit(None) == auto.slow_phase_s  # no step yet
    off = Timeouts(0.0)
    assert not off.enabled and off.collective_s == 1800
    for t in (Timeouts(5.0), Timeouts(700.0), auto):  # each above the one before
        assert t.step_limit(1.0) < t.slow_phase_s < t.collective_s < t.nccl_heartbeat_s
    assert Timeouts(700.0).collective_s == 1020  # whole minutes (megatron takes minutes)


def test_hang_timeout_validation():
    assert load_config(None, []).validate().run.hang_timeout is None
    assert load_config(None, ["run.hang_timeout=0"]).validate().run.hang_timeout == 0
    for bad, text in (("-1", "run.hang_timeout=-1.0"), ("2", "run.hang_timeout=2.0")):
        with pytest.raises(ConfigError, match=text.replace(".", r"\.")):
            load_config(None, [f"run.hang_timeout={bad}"]).validate()
    with pytest.raises(ConfigError, match="tracking.straggler_threshold=1.0 must be > 1"):
        load_config(None, ["tracking.straggler_threshold=1"]).validate()
    with pytest.raises(ConfigError, match="tracking.straggler_windows=0"):
        load_config(None, ["tracking.straggler_windows=0"]).validate()


def test_gpu_rank_gets_nccl_watchdog_env_and_every_group_the_timeout(tmp_path, monkeypatch):
    """What a GPU rank runs with: TORCH_NCCL_* set before its process groups exist (an exported
    value wins), the collective timeout on torch's default group, megatron's groups and
    megamor's own; a CPU rank gets no NCCL variables."""
    cfg = load_config(None, ["run.hang_timeout=10", f"run.output_dir={tmp_path}"]).validate()
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}
    timeout_s, applied = watchdog.prepare_collectives(cfg, "cuda", env)
    assert timeout_s == 360
    assert applied == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "420", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "logs" / "nccl_trace_rank_")}
    assert env == dict(applied, TORCH_NCCL_TRACE_BUFFER_SIZE="50")
    cpu_env: dict = {}
    assert watchdog.prepare_collectives(cfg, "cpu", cpu_env) == (360, {}) and cpu_env == {}
    auto = load_config(None, []).validate()
    assert watchdog.prepare_collectives(auto, "cuda", {})[1]["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] \
        == "1860"

    # The timeout reaches torch.distributed and megatron (stand-ins record the calls).
    seen = {}
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group",
                        lambda **kw: seen.setdefault("torch", kw["timeout"]))
    parallel.init_process_group(torch.device("cpu"), timeout_s)
    assert seen["torch"] == datetime.timedelta(seconds=360)

    class Stop(Exception):
        pass

    def megatron_init(**kw):
        seen["megatron"] = kw
        raise Stop

    monkeypatch.setattr(parallel, "init_process_group", lambda device, t: None)
    monkeypatch.setattr(parallel.mps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(parallel.mps, "initialize_model_parallel", megatron_init)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    with pytest.raises(Stop):
        parallel.initialize(1, 1, torch.device("cpu"), timeout_s=timeout_s)
    assert seen["megatron"]["distributed_timeout_minutes"] == 6


# ----------------------------------------------------------------------------- the decision


def rec(rank, step, phase, t, median=0.1, **kw):
    return dict(rank=rank, pid=1000 + rank, host="n1", step=step, phase=phase, t=t,
                median_step_s=median, **kw)


def test_laggard_is_the_rank_behind_the_others():
    t = Timeouts(10.0)
    ranks = {0: rec(0, 7, "grad_sync", 100.0), 1: rec(1, 7, "data", 95.0),
             2: rec(2, 7, "grad_sync", 100.5), 3: rec(3, 6, "checkpoint", 90.0)}
    ranks[3] = rec(3, 7, "forward_backward", 96.0)
    assert judge(ranks, 4, t, now=110.0) is None  # 9.5 s since rank 2 advanced
    v = judge(ranks, 4, t, now=111.0)
    assert [r["rank"] for r in v.laggards] == [1, 3] and [r["rank"] for r in v.waiting] == [0, 2]
    assert (v.limit_s, v.limit_why) == (10.0, "run.hang_timeout") and not v.tie
    line = verdict_line(v, Path("/r/logs/hang-x"))
    assert line.startswith("megamor: hang: no rank advanced for 10 s (limit 10 s, "
                           "run.hang_timeout): did not reach the collective: rank 1 in data "
                           "(loading its batch) at step 7 (pid 1001 on n1); rank 3 in "
                           "forward/backward at step 7 (pid 1003 on n1); ranks 0, 2 wait in "
                           "gradient sync (all-reduce) at step 7; stacks in /r/logs/hang-x/; "
                           "exiting with 76"), line
    assert "\n" not in line


def test_slow_phases_auto_limit_ties_and_silent_nodes():
    t = Timeouts(10.0)
    # A checkpoint save (or evaluation, start-up) longer than the hang limit is not a hang ...
    saving = {0: rec(0, 6, "checkpoint", 0.0), 1: rec(1, 6, "checkpoint", 1.0)}
    assert judge(saving, 2, t, now=250.0) is None
    # ... until the collective timeout less a minute.
    v = judge(saving, 2, t, now=302.0)
    assert v.limit_s == 300.0 and v.limit_why == "during checkpoint save" and v.tie
    assert "all 2 ranks are in checkpoint save at step 6 and none is behind" in \
        verdict_line(v, Path("/x"))
    # Before any step completed: the same allowance.
    assert judge({0: rec(0, 1, "data", 0.0, median=None)}, 1, t, now=200.0) is None
    # Auto: 10 x the median step, at least 5 minutes.
    auto = Timeouts(None)
    slow = {0: rec(0, 9, "grad_sync", 0.0, median=45.0), 1: rec(1, 9, "data", 0.0, median=44.0)}
    assert judge(slow, 2, auto, now=449.0) is None
    v = judge(slow, 2, auto, now=451.0)
    assert v.limit_s == 450.0 and v.limit_why == "auto: 10 x the median step 45 s"
    # Off.
    assert judge(slow, 2, Timeouts(0.0), now=1e9) is None
    # A tie: the stopped process is named.
    tie = {0: rec(0, 4, "grad_sync", 0.0, state="sleeping"),
           1: rec(1, 4, "grad_sync", 0.0, state="stopped")}
    v = judge(tie, 2, t, now=20.0)
    assert [r["rank"] for r in v.laggards] == [1] and not v.tie
    assert "rank 1 in gradient sync (all-reduce) at step 4 (pid 1001 on n1, stopped (SIGSTOP " \
           "or a debugger))" in verdict_line(v, Path("/x"))
    # A node that stopped publishing: its ranks are missing, not judged on stale records.
    nodes = {0: rec(0, 4, "grad_sync", 0.0), 1: rec(1, 4, "grad_sync", 0.0),
             2: rec(2, 3, "data", 0.0, stale=True), 3: rec(3, 3, "data", 0.0, stale=True)}
    v = judge(nodes, 4, t, now=20.0)
    assert v.missing == [2, 3] and not v.laggards
    assert "no progress report from ranks 2-3 (its node or node watcher is unresponsive)" in \
        verdict_line(v, Path("/x"))


def test_two_node_watchers_share_the_run_directory(tmp_path):
    """Node 0 (ranks 0, 1) and node 1 (ranks 2, 3), each with its own progress directory; they
    see each other through <run>/logs/progress/node_<N>.json; a node that stops publishing
    becomes 'missing'."""
    t = Timeouts(10.0)
    out = tmp_path / "run"
    dirs = [tmp_path / "n0", tmp_path / "n1"]
    reporters = {r: Progress(r, dirs[r // 2], node=r // 2) for r in range(4)}
    watchers = [NodeWatcher(dirs[n], out, t, 4, 2, node=n, launch="job-7") for n in (0, 1)]
    for step in (1, 2):
        for r, p in reporters.items():
            p.enter("data", step)
            p.enter("forward_backward", step)
            if r != 3 or step == 1:
                p.enter("grad_sync", step)
    now = time.time()
    for w in watchers:
        assert w.poll(now) is None  # reads and publishes
    later = now + 10.0 + watchers[0].publish_s + 2.5
    v = watchers[0].poll(later, force=True)
    assert v is not None and [r["rank"] for r in v.laggards] == [3]
    assert v.laggards[0]["phase"] == "forward_backward" and v.laggards[0]["node"] == 1
    assert [r["rank"] for r in v.waiting] == [0, 1, 2]
    # Both nodes end the job: each dumps its own ranks' stacks and kills its own ranks; one of
    # them prints the line and writes hung.json.
    import io
    import threading
    outs, killed = [io.StringIO(), io.StringIO()], []
    for n, w in enumerate(watchers):
        w.out = outs[n]
        w.dump_stacks = lambda: []  # tested with a live process below
    verdicts = [w.poll(later, force=True) for w in watchers]
    threads = [threading.Thread(target=w.end_job, args=(v, lambda n=n: killed.append(n)),
                                kwargs={"grace_s": 10}) for n, (w, v) in
               enumerate(zip(watchers, verdicts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = [o.getvalue() for o in outs if o.getvalue()]
    assert sorted(killed) == [0, 1] and len(lines) == 1, (killed, lines)
    marker = json.loads((out / "hung.json").read_text())
    assert marker["laggards"] == [3] and marker["line"] == lines[0].strip()
    assert "did not reach the collective: rank 3 in forward/backward at step 2" in lines[0]
    assert len((out / "logs" / "hangs.jsonl").read_text().splitlines()) == 1
    # Node 1's watcher goes silent: node 0 no longer trusts its old records.
    silent = later + 3 * watchers[0].publish_s + 11
    v = watchers[0].poll(silent, force=True)
    assert v.missing == [2, 3] and not v.laggards
    for p in reporters.values():
        p.close()


def test_stacks_from_a_live_rank_and_py_spy(tmp_path, monkeypatch):
    """A process that registered its stacks file (as every rank does) answers SIGUSR2 with its
    Python stack, even while blocked; py-spy, when on PATH, is asked for a non-blocking dump."""
    progress_dir, out = tmp_path / "p", tmp_path / "run"
    code = ("import sys, time; from megamor.progress import Progress\n"
            f"p = Progress(1, {str(progress_dir)!r}); p.enter('data', 3)\n"
            "def waiting_in_collective():\n    print('ready', flush=True); time.sleep(60)\n"
            "waiting_in_collective()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout.readline().strip() == "ready"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "py-spy"
        fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'py-spy.args'}\n"
                        "echo 'Thread 1 (idle): MainThread'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        w = NodeWatcher(progress_dir, out, Timeouts(10.0), 2, 2)
        w.read_local()
        assert read_record(record_path(progress_dir, 1))["pid"] == child.pid
        (path,) = w.dump_stacks()
        text = path.read_text()
        assert text.startswith(f"rank 1 (pid {child.pid} on ")
        assert "data (loading its batch) at step 3" in text
        assert 'line 4 in waiting_in_collective' in text, text  # the blocked frame
        assert "--- py-spy dump --nonblocking\nThread 1 (idle): MainThread" in text
        assert (tmp_path / "py-spy.args").read_text().split() == \
            ["dump", "--pid", str(child.pid), "--nonblocking"]
        # Stopped: no stack can come; the file says so instead of waiting for one.
        os.kill(child.pid, signal.SIGSTOP)
        while psutil.Process(child.pid).status() != "stopped":
            time.sleep(0.01)
        monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
        w.read_local()
        t0 = time.time()
        (path,) = w.dump_stacks()
        assert time.time() - t0 < 2 and "process state stopped" in path.read_text()
        assert "cannot write its Python stack until it runs again" in path.read_text()
    finally:
        child.kill()
        child.wait()


def test_progress_records_and_test_delays(tmp_path):
    p = Progress(0, tmp_path)
    for step in (1, 2, 3):
        p.enter("data", step)
        p.enter("optimizer", step)
    r = read_record(record_path(tmp_path, 0))
    assert (r["step"], r["phase"], r["seq"], r["pid"]) == (3, "optimizer", 6, os.getpid())
    assert r["median_step_s"] is not None and r["median_step_s"] < 1
    p.close()
    assert parse_test_delays("data@1=0.2, checkpoint@0#6=13") == [
        ("data", 1, None, 0.2), ("checkpoint", 0, 6, 13.0)]
    with pytest.raises(ValueError, match="cannot read 'dta@1=2'"):
        parse_test_delays("dta@1=2")
    assert node_watcher.node_progress_dir({"SLURM_JOB_ID": "5", "NODE_RANK": "1"}) == \
        node_watcher.node_progress_dir({"SLURM_JOB_ID": "5", "NODE_RANK": "1"}) != \
        node_watcher.node_progress_dir({"SLURM_JOB_ID": "5", "NODE_RANK": "0"})


# ----------------------------------------------------------------------------- stragglers


def test_straggler_windows_and_warning():
    dims = SimpleNamespace(world_size=4, pp=2, pp_rank=0, rank=0)
    s = Stragglers(dims, torch.device("cpu"), threshold=1.2, windows=3, measures_wait=False)
    s.hosts = ["a", "b", "c", "d"]
    # [stage, compute/step, wait/step]: stage 0 = ranks 0, 2; stage 1 = ranks 1, 3. Stage 1
    # does more work by design (no straggler there); rank 2 is slow within stage 0.
    table = [[0, 1.0, 0.5], [1, 3.0, 0.1], [0, 1.5, 0.0], [1, 3.0, 0.1]]
    m, w = s.judge(table, step=10, steps=10)
    assert m["straggler/rank"] == 2 and m["straggler/ratio"] == pytest.approx(1.2)
    assert m["straggler/median_compute_s"] == pytest.approx(1.25) and w is None
    assert line_part(m) == "slowest r2 1.20x"
    assert s.judge(table, 20, 10)[1] is None
    m, w = s.judge(table, 30, 10)
    assert w == ("straggler: rank 2 (on c) computed 1.20x its pipeline stage's median rank's "
                 "time for 3 logging windows in a row (steps 1-30); the others wait 33% of "
                 "their step")
    assert s.judge(table, 40, 10)[1] is None  # once per episode
    even = [[0, 1.0, 0.1], [1, 3.0, 0.1], [0, 1.0, 0.1], [1, 3.0, 0.1]]
    assert s.judge(even, 50, 10)[0]["straggler/ratio"] == pytest.approx(1.0)
    assert all(s.judge(table, 60 + 10 * i, 10)[1] is None for i in range(2))
    assert s.judge(table, 80, 10)[1] is not None  # a new episode warns again


def test_sections_time_on_cuda_with_events(monkeypatch):
    """On a GPU, compute and wait come from CUDA events on the current stream (host clocks
    would see kernel launches only): one event per phase change, read after synchronising the
    window's last one."""
    made = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at, self.synced = None, False
            made.append(self)

        def record(self):
            self.at = 100.0 * len(made)  # ms on the device timeline

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    sec = Sections("cuda")
    for phase in ("data", "forward_backward", "grad_sync", "optimizer", "metrics", "step_end",
                  "data"):
        sec.mark(phase)
    compute, wait = sec.take()
    # data + forward_backward + optimizer = 3 x 100 ms; grad_sync = 100 ms; metrics not counted
    assert (compute, wait) == (pytest.approx(0.3), pytest.approx(0.1))
    assert len(made) == 7 and made[4].synced  # the optimizer span's end: the window's last
    cpu = Sections("cpu")
    for phase in ("data", "grad_sync", "metrics"):
        cpu.mark(phase)
        time.sleep(0.01)
    compute, wait = cpu.take()
    assert compute >= 0.01 and wait >= 0.01  # perf_counter spans (no upper bound: a busy machine)
