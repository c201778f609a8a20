"""Slurm launch path: node lists and rank variables, the four H100 batch scripts judged by a real
slurmctld, a 2-task CPU job end to end through sbatch, preemption by USR1 -> checkpoint ->
requeue -> resume, then a frozen rank -> hang watchdog -> requeue -> resume, with the same final
loss, a two-host rehearsal over a veth pair between two network namespaces, and bad input failing
before any rank computes.

The cluster comes from tests/slurm/setup_cluster.sh (Debian's slurm-wlm + munge, one real node
plus simulated H100 nodes, its own slurm.conf); .ci/run runs it before pytest. The tests talk
only to that cluster (SLURM_CONF), or to the one named by MEGAMOR_TEST_SLURM_CLUSTER (its
ClusterName; it needs partitions `cpu` and `h100` like the test cluster); otherwise, and without
root or apt, the cluster tests skip with the reason. The parser tests always run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import freeze_in_data
from megamor.launch import slurm as L
from megamor.node_watcher import node_progress_dir

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "slurm" / "setup_cluster.sh"
SCRIPTS = ["135m", "360m", "730m", "1p7b"]
NAMED_CLUSTER = "MEGAMOR_TEST_SLURM_CLUSTER"
TINY = ["model.preset=tiny", "model.seq_length=64", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_steps=1", "train.log_interval=1"]
STEPS = 60


# ----------------------------------------------------------------------------- no cluster needed


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10],login-a", ["gpu8", "gpu9", "gpu10", "login-a"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1,3],b[001-002]-ib", ["a1", "a3", "b001-ib", "b002-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert L.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node]1", "node[a-b]", "node[5-2]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(L.LaunchError, match="node list"):
        L.expand_nodelist(bad)


def test_rank_env_from_slurm(monkeypatch):
    monkeypatch.setenv("MEGAMOR_NODELIST_PARSER", "builtin")
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "localhost,nohost-x", "SLURM_JOB_ID": "1234",
           "SLURM_NTASKS_PER_NODE": "8"}
    r = L.rank_env(env)
    assert (r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"], r["NODE_RANK"], r["LOCAL_WORLD_SIZE"]) \
        == ("9", "16", "1", "1", "8")
    assert r["MASTER_ADDR"] in ("127.0.0.1", "::1")
    assert r["MASTER_PORT"] == str(L.default_port(env))
    assert L.default_port(env) != L.default_port({**env, "SLURM_RESTART_COUNT": "1"})
    assert L.rank_env({**env, "MEGAMOR_MASTER_PORT": "4242"})["MASTER_PORT"] == "4242"
    # torchrun's variables are taken as they are
    assert L.rank_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) \
        == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
            "MASTER_PORT": "1"}


def _launch(args, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                   "MASTER_"))}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "megamor.launch.slurm", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_input_fails_before_ranks(tmp_path):
    """Missing config, a layout the allocation cannot hold, an unresolvable node list: exit 2
    with one `megamor launch:` line, before torch.distributed starts."""
    p = _launch(["--check", "--world-size", "2", "--", "pretrain", "--config",
                 str(tmp_path / "missing.yaml")])
    assert p.returncode == 2 and "missing.yaml does not exist" in p.stderr, p.stderr
    p = _launch(["--check", "--world-size", "12", "--", "pretrain", *TINY,
                 "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=4"])
    assert p.returncode == 2 and "world size 12 is not divisible" in p.stderr, p.stderr
    # inside an srun task: the node list is resolved before the config is even loaded
    task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "no-such-host-zq[1-2]",
            "MEGAMOR_NODELIST_PARSER": "builtin"}
    p = _launch(["--", "pretrain", *TINY, f"run.output_dir={tmp_path / 'run'}"], env=task)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "cannot resolve the rendezvous host 'no-such-host-zq1'" in p.stderr, p.stderr
    assert "step" not in p.stdout and not (tmp_path / "run").exists()
    assert len([l for l in p.stderr.splitlines() if l.startswith("megamor launch:")]) == 1


def test_gpu_scripts_refuse_to_train_on_the_demo_corpus_unless_named(tmp_path):
    """`sbatch slurm/pretrain_1p7b.sh` without data: exit 2 before srun, saying how to name the
    data; data.path on the command line or in the config file (data.path=builtin included)
    is accepted. CPU allocations keep the built-in default (CI's jobs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(MEGAMOR_HOME=str(REPO), MEGAMOR_PYTHON=sys.executable, MEGAMOR_DRY_RUN="1",
               MEGAMOR_GPUS_PER_NODE="8", SLURM_JOB_NUM_NODES="8", SLURM_NTASKS="64",
               MEGAMOR_OUTPUT_DIR=str(tmp_path / "run"))
    p = subprocess.run(["bash", str(REPO / "slurm" / "pretrain_1p7b.sh")], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "srun --ntasks" not in p.stdout, p.stdout + p.stderr
    assert "megamor launch: no training data named: this GPU job would train on the built-in " \
        "demo corpus" in p.stderr and "data.path=builtin for a smoke run" in p.stderr, p.stderr
    assert "preflight failed; not starting srun" in p.stdout
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  path: /data/prepared\n")
    assert L.data_named(["pretrain", "data.path=builtin"])
    assert L.data_named(["pretrain", "--config", str(cfg), "train.lr=1e-3"])
    cfg.write_text("train:\n  lr: 0.001\n")
    assert not L.data_named(["pretrain", "--config", str(cfg), "--resume", "auto"])


def test_preflight_prints_the_address_of_each_side(tmp_path):
    """gloo's and NCCL's addresses on this node, GLOO_SOCKET_IFNAME taken from
    NCCL_SOCKET_IFNAME when unset, a missing interface or a loopback address across nodes
    refused before any rank starts."""
    args = ["--check", "--world-size", "2", "--", "pretrain", *TINY, "train.device=cuda",
            f"run.output_dir={tmp_path / 'run'}"]
    one = {"SLURM_JOB_NODELIST": "localhost", "NCCL_SOCKET_IFNAME": "lo"}
    p = _launch(args, env={**one, "GLOO_SOCKET_IFNAME": "lo"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "gloo lo 127.0.0.1 (GLOO_SOCKET_IFNAME); nccl lo 127.0.0.1 (NCCL_SOCKET_IFNAME=lo)" \
        in p.stdout, p.stdout
    p = _launch(args, env=one)
    assert "gloo lo 127.0.0.1 (GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME)" in p.stdout, p.stdout
    p = _launch(args, env={**one, "GLOO_SOCKET_IFNAME": "nosuch0"})
    assert p.returncode == 2 and "GLOO_SOCKET_IFNAME=nosuch0: this node" in p.stderr, p.stderr
    p = _launch(args, env={**one, "SLURM_JOB_NODELIST": "localhost,localhost"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "gloo would bind to a loopback address (lo 127.0.0.1; GLOO_SOCKET_IFNAME from " \
        "NCCL_SOCKET_IFNAME), which the other 1 node(s) cannot reach" in p.stderr, p.stderr


def test_network_choice_rules():
    from megamor.launch import network as N

    names = ["docker0", "eth0", "eth1", "ib0", "lo"]
    assert N.nccl_selects("eth", names) == ["eth0", "eth1"]
    assert N.nccl_selects("=eth0", names) == ["eth0"]
    assert N.nccl_selects("^docker,lo", names) == ["eth0", "eth1", "ib0"]
    addrs = {"lo": ["127.0.0.1"], "eth0": ["10.0.0.5"], "ib0": ["10.1.0.5"], "docker0": []}
    assert N.gloo_default({"NCCL_SOCKET_IFNAME": "^docker,lo"}, addrs) == "eth0"
    assert N.gloo_default({"NCCL_SOCKET_IFNAME": "ib"}, addrs) == "ib0"
    assert N.gloo_default({"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "eth0"}, addrs) is None
    # Debian's `127.0.1.1 <hostname>`: fine on one node, a hang across nodes.
    loop = dict(addrs=addrs, resolve=lambda host: "127.0.1.1")
    assert N.problem({}, 1, **loop) is None
    assert "loopback address (127.0.1.1; hostname " in N.problem({}, 4, **loop)
    assert N.problem({"GLOO_SOCKET_IFNAME": "eth0"}, 4, **loop) is None
    assert N.describe({"NCCL_SOCKET_IFNAME": "ib"}, True, **loop) == \
        "gloo ib0 10.1.0.5 (GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME); " \
        "nccl ib0 10.1.0.5 (NCCL_SOCKET_IFNAME=ib)"


def test_megamor_launch_subcommand():
    from megamor.cli import main
    assert main(["launch", "--check", "--world-size", "4", "--", "pretrain", *TINY,
                 "parallel.pipeline_model_parallel_size=2"]) == 0
    assert main(["launch", "--check", "--world-size", "3", "--", "pretrain", *TINY,
                 "parallel.pipeline_model_parallel_size=2"]) == 2
    assert main(["launch", "--check", "--world-size", "2", "--", "pretrain", "--bogus"]) == 2


# ----------------------------------------------------------------------------- the cluster


def _slurm_config(env: dict) -> dict:
    """`scontrol show config` of the controller `env` points at ({} if none answers)."""
    try:
        p = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if p.returncode != 0:
        return {}
    pairs = (line.partition("=") for line in p.stdout.splitlines())
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


@pytest.fixture(scope="session")
def cluster():
    """The Slurm cluster these tests may use: the one setup_cluster.sh starts (root), or the one
    named by MEGAMOR_TEST_SLURM_CLUSTER; never whatever cluster the machine happens to reach."""
    named = os.environ.get(NAMED_CLUSTER)
    if named:
        conf = _slurm_config(dict(os.environ))
        if conf.get("ClusterName") != named:
            pytest.skip(f"{NAMED_CLUSTER}={named}, but the reachable Slurm controller is "
                        f"{conf.get('ClusterName') or 'none'} (SLURM_CONF={conf.get('SLURM_CONF')})")
        parts = set(subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True,
                                   text=True).stdout.split())
        if not {"cpu", "h100"} <= parts:
            pytest.skip(f"cluster {named} has partitions {sorted(parts)}; the tests need `cpu` "
                        f"(real node) and `h100` (simulated) as tests/slurm/setup_cluster.sh makes")
        yield {"conf": conf.get("SLURM_CONF")}
        return
    if os.geteuid() != 0:
        pytest.skip(f"the Slurm tests start their own cluster (tests/slurm/setup_cluster.sh), "
                    f"which needs root; or set {NAMED_CLUSTER}=<ClusterName> of a test cluster")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and apt-get is unavailable")
    p = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if p.returncode == 3:
        pytest.skip(f"not starting a test cluster: {p.stderr.strip()}")
    if p.returncode != 0:
        pytest.fail(f"setup_cluster.sh failed:\n{p.stdout}\n{p.stderr}")
    path = p.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    conf = _slurm_config(dict(os.environ, SLURM_CONF=path))
    assert conf.get("SLURM_CONF") == path, (path, conf.get("SLURM_CONF"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = path  # every sbatch/scontrol below, and the jobs' srun
    yield {"conf": path}
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _cpu_env(tmp: Path, out: Path, log: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"}
    env.update({
        "MEGAMOR_HOME": str(REPO), "MEGAMOR_PYTHON": sys.executable,
        "MEGAMOR_GPUS_PER_NODE": "0", "MEGAMOR_NODES": "1", "MEGAMOR_NTASKS_PER_NODE": "2",
        "MEGAMOR_CPUS_PER_TASK": "1", "MEGAMOR_PARTITION": "cpu",
        "MEGAMOR_LOG": str(log), "MEGAMOR_OUTPUT_DIR": str(out),
        "MEGAMOR_SBATCH_ARGS": "--parsable --time=60",  # > the 600 s of --signal
    })
    env.update(extra)
    return env


def _submit(env: dict, script: str, overrides: list[str]) -> str:
    p = subprocess.run([str(REPO / "slurm" / "submit.sh"), str(REPO / "slurm" / script),
                        *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().splitlines()[-1].split(";")[0]


def _job(jid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True,
                         text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_done(jid: str, timeout: float, on_pending=None) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = _job(jid)
        if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                 "OUT_OF_MEMORY"):
            return j
        if on_pending is not None and j.get("JobState") == "PENDING":
            on_pending(j)
        time.sleep(0.5)
    subprocess.run(["scancel", jid])
    raise AssertionError(f"job {jid} did not finish in {timeout}s: {_job(jid)}")


def _last(metrics: Path) -> dict:
    return json.loads(metrics.read_text().splitlines()[-1])


@pytest.mark.parametrize("size", SCRIPTS)
@pytest.mark.slow
def test_sbatch_test_only_accepts_scripts(cluster, size):
    """slurmctld judges each script's headers against simulated 8 x H100 nodes."""
    p = subprocess.run(["sbatch", "--test-only", "--partition=h100",
                        str(REPO / "slurm" / f"pretrain_{size}.sh")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    msg = p.stdout + p.stderr
    assert p.returncode == 0 and "to start at" in msg, msg
    nodes = {"135m": 1, "360m": 2, "730m": 4, "1p7b": 8}[size]
    assert f"using {nodes * 112} processors" in msg, msg


@pytest.mark.parametrize("size", SCRIPTS)
@pytest.mark.slow
def test_script_layout_fits_its_allocation(cluster, size, tmp_path):
    """The default layout of each script passes the preflight for its own node count. The
    default output directory is runs/<job name> (a new sbatch resumes), or with
    MEGAMOR_OUTPUT_PER_JOB=1 runs/<job name>-<job id> (checked on one script)."""
    script = (REPO / "slurm" / f"pretrain_{size}.sh").read_text()
    nodes = int(script.split("#SBATCH --nodes=")[1].split()[0])
    env = _cpu_env(tmp_path, tmp_path / "run", tmp_path / "log",
                   SLURM_JOB_NUM_NODES=str(nodes), SLURM_NTASKS=str(nodes * 8),
                   MEGAMOR_DRY_RUN="1", MEGAMOR_GPUS_PER_NODE="8", MEGAMOR_NTASKS_PER_NODE="8",
                   SLURM_JOB_NAME=f"mmtest-{size}-{os.getpid()}", SLURM_JOB_ID="77")
    del env["MEGAMOR_OUTPUT_DIR"]
    want = REPO / "runs" / env["SLURM_JOB_NAME"]
    if size == "360m":
        env["MEGAMOR_OUTPUT_PER_JOB"] = "1"
        want = want.with_name(want.name + "-77")
    p = subprocess.run(["bash", str(REPO / "slurm" / f"pretrain_{size}.sh"), "data.path=builtin"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "preflight ok" in p.stdout, p.stdout + p.stderr
    assert f"srun --ntasks={nodes * 8} --ntasks-per-node=8" in p.stdout
    assert f"output {want}\n" in p.stdout and f"run.output_dir={want}" in p.stdout.split(), \
        p.stdout
    assert not want.exists()  # a dry run writes nothing
    if size == "1p7b":  # the DeepSpeed engine from the same script: pp 1, bf16, ZeRO stage
        env.update(MEGAMOR_ENGINE="deepspeed", MEGAMOR_ZERO_STAGE="3")
        p = subprocess.run(["bash", str(REPO / "slurm" / "pretrain_1p7b.sh"), "data.path=builtin"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "preflight ok" in p.stdout, p.stdout + p.stderr
        srun = p.stdout.split("srun ", 1)[1].split()
        for arg in ("parallel.engine=deepspeed", "parallel.zero_stage=3", "train.precision=bf16",
                    "parallel.pipeline_model_parallel_size=1"):
            assert arg in srun, p.stdout


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One builtin dataset (tokenizer + shards) shared by every run here."""
    return tmp_path_factory.mktemp("slurm_data") / "builtin"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("slurm_ref")
    env = _cpu_env(tmp, tmp / "run", tmp / "job.out")
    jid = _submit(env, "pretrain_135m.sh", [*TINY, f"train.train_steps={STEPS}",
                                            f"data.builtin_root={data_root}"])
    j = _wait_done(jid, 240)
    return tmp, j


@pytest.mark.slow
def test_sbatch_cpu_job_end_to_end(uninterrupted):
    tmp, j = uninterrupted
    log = (tmp / "job.out").read_text()
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, log)
    assert "2 task(s)" in log and "rank 0 of 2" in log
    assert f"step {STEPS:>5} | loss" in log, log
    assert f"latest checkpoint: {tmp / 'run'}/checkpoints/step_{STEPS:08d}" in log, log
    assert (tmp / "run" / "checkpoints" / f"step_{STEPS:08d}" / "megamor.json").is_file()


@pytest.mark.slow
def test_preempt_requeue_resume_same_loss(uninterrupted, tmp_path, data_root):
    """USR1 to the batch shell after periodic checkpoints (Slurm signals every process of the
    step, megatron's checkpoint helpers included) -> ranks checkpoint and exit 75 -> scontrol
    requeue -> the job runs again with --resume auto. There rank 1 is frozen (SIGSTOP) -> the
    node's hang watchdog writes the stacks, prints one line naming rank 1, ends the step -> the
    batch script sees hung.json, exits 76 and requeues -> the third run resumes from the last
    checkpoint and ends with the uninterrupted run's final loss. Meanwhile another job cannot
    take the same output directory."""
    ref_tmp, _ = uninterrupted
    hang = 10
    # Rank 1's data path slowed a little: the test can catch it there (freeze_in_data).
    env = _cpu_env(tmp_path, tmp_path / "run", tmp_path / "job.out",
                   MEGAMOR_TEST_DELAY="data@1=0.05")
    jid = _submit(env, "pretrain_135m.sh", [*TINY, f"train.train_steps={STEPS}",
                                            "checkpoint.save_interval=2",
                                            f"run.hang_timeout={hang}",
                                            f"data.builtin_root={data_root}"])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 900  # a hang guard, not a speed bound
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() < deadline, f"job {jid} never trained: {_job(jid)}"
        assert _job(jid).get("JobState") in ("PENDING", "RUNNING"), _job(jid)
        time.sleep(0.2)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    other = subprocess.run(["bash", str(REPO / "slurm" / "pretrain_135m.sh")], cwd=REPO,
                           env=dict(env, MEGAMOR_DRY_RUN="1", SLURM_JOB_ID="1"),
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and f"job {jid} (queued or running) uses {tmp_path / 'run'}" \
        in other.stdout, other.stdout + other.stderr

    held: dict = {}

    def release(j):
        # Slurm holds a requeued job back for a while (Reason=BeginTime); start it a few seconds
        # after the requeue (at once, slurmd may not have cleaned up the last run yet and the
        # start fails with "Job credential revoked").
        if j.get("Restarts", "0") != "0" and j.get("Reason") == "BeginTime":
            since = held.setdefault(j["Restarts"], time.time())
            if time.time() - since > 3:
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"])

    # The second run's node-local progress directory, as its tasks derive it.
    progress = node_progress_dir({"SLURM_JOB_ID": jid, "SLURM_RESTART_COUNT": "1",
                                  "SLURM_STEP_ID": "0", "NODE_RANK": "0"})
    frozen = freeze_in_data(progress, 1, 1, timeout=240,
                            while_waiting=lambda: release(_job(jid)))
    step = frozen["step"]
    j = _wait_done(jid, 300, on_pending=release)
    log = (tmp_path / "job.out").read_text()
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", (j, log)
    assert j["Restarts"] == "2", j
    assert "USR1: asking the ranks to checkpoint" in log
    assert "SIGUSR1: saved" in log and "exiting with 75" in log and "srun exited with 75" in log, log
    assert "Traceback" not in log and "BrokenPipe" not in log, log
    assert f"scontrol requeue {jid}" in log and "restart 1:" in log, log
    assert log.count("resumed from") == 2, log
    # The stall: one line naming the frozen rank; stacks; exit 76; requeued; resumed.
    (line,) = [l for l in log.splitlines() if l.startswith("megamor: hang:")]
    assert (f"(limit {hang} s, run.hang_timeout): did not reach the collective: rank 1 in data "
            f"(loading its batch) at step {step} (pid {frozen['pid']} on ") in line, line
    assert "stopped (SIGSTOP or a debugger)); rank 0 waits in gradient sync (all-reduce) at " \
           f"step {step}" in line, line
    assert f"stacks in {tmp_path / 'run' / 'logs' / f'hang-job{jid}-r1'}/" in line, line
    stacks = tmp_path / "run" / "logs" / f"hang-job{jid}-r1"
    assert "process state stopped" in (stacks / "rank_1.txt").read_text()
    assert "Current thread" in (stacks / "rank_0.txt").read_text()
    assert "srun exited with 76" in log and "a rank stalled (stall 1 at checkpoint step_" in log
    assert "restart 2:" in log, log
    hangs = [json.loads(l) for l in (tmp_path / "run" / "logs" / "hangs.jsonl").read_text()
             .splitlines()]
    assert len(hangs) == 1 and hangs[0]["line"] == line and hangs[0]["laggards"] == [1]
    assert not (tmp_path / "run" / "hung.json").exists()  # the resumed run removed it
    stopped = json.loads((tmp_path / "run" / "preempted.json").read_text()
                         if (tmp_path / "run" / "preempted.json").exists() else "{}")
    assert not stopped  # the resumed run removed the marker
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    ref = _last(ref_tmp / "run" / "metrics.jsonl")
    got = _last(metrics)
    assert got["step"] == ref["step"] == STEPS
    assert got["loss"] == ref["loss"], (got["loss"], ref["loss"])


@pytest.mark.slow
def test_sbatch_bad_layout_fails_before_srun(cluster, tmp_path, data_root):
    env = _cpu_env(tmp_path, tmp_path / "run", tmp_path / "job.out", MEGAMOR_PP="4")
    jid = _submit(env, "pretrain_135m.sh", [*TINY, f"data.builtin_root={data_root}"])
    j = _wait_done(jid, 120)
    log = (tmp_path / "job.out").read_text()
    assert j["JobState"] == "FAILED" and j["ExitCode"] == "2:0", (j, log)
    assert "world size 2 is not divisible by tensor x pipeline parallel = 1 x 4" in log, log
    assert "preflight failed; not starting srun" in log and "rank 0 of" not in log


# ----------------------------------------------------------------------------- two hosts


@pytest.fixture
def two_hosts(cluster):
    """Two network namespaces joined by a veth pair: host a 10.77.0.1, host b 10.77.0.2."""
    if not shutil.which("ip"):
        pytest.skip("iproute2 is not installed")
    tag = f"mm{os.getpid() % 100000}"
    ns = [f"{tag}a", f"{tag}b"]
    addr = ["10.77.0.1", "10.77.0.2"]
    names = [f"{tag}node1", f"{tag}node2"]

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for n, dev, a in zip(ns, (f"{tag}va", f"{tag}vb"), addr):
            sh("ip", "link", "set", dev, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{a}/24", "dev", dev)
            sh("ip", "-n", n, "link", "set", dev, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
            # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: each host's DNS.
            d = Path("/etc/netns") / n
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("127.0.0.1 localhost\n"
                                     + "".join(f"{x} {h}\n" for x, h in zip(addr, names)))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    yield {"ns": ns, "addr": addr, "names": names, "devs": [f"{tag}va", f"{tag}vb"],
           "nodelist": f"{tag}node[1-2]"}
    for n in ns:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)


@pytest.mark.slow
def test_two_hosts_over_veth(two_hosts, tmp_path, data_root):
    """Rank 0 in namespace a, rank 1 in namespace b: the rendezvous address comes from the node
    list (host a resolved through that namespace's hosts file), gloo talks over the veth link."""
    h = two_hosts
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))}
    procs = []
    for rank in (0, 1):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID="0",
                   SLURM_NODEID=str(rank), SLURM_STEP_ID="0", SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST=h["nodelist"], SLURM_NTASKS_PER_NODE="1",
                   MEGAMOR_NODELIST_PARSER="builtin", GLOO_SOCKET_IFNAME=h["devs"][rank],
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", h["ns"][rank], sys.executable, "-m", "megamor.launch.slurm", "--",
             "pretrain", *TINY, "train.train_steps=3", "train.device=cpu",
             f"data.builtin_root={data_root}", f"run.output_dir={tmp_path / 'run'}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if rank == 0:
            time.sleep(0.5)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(outs)
    port = L.default_port({"SLURM_JOB_ID": "4242"})
    assert f"rank 0 of 2, rendezvous {h['addr'][0]}:{port}" in outs[0], outs[0]
    assert "step     3 | loss" in outs[0]
    assert _last(tmp_path / "run" / "metrics.jsonl")["step"] == 3
