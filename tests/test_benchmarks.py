"""benchmarks/perf.py run as users run it (a subprocess, at a toy shape): every kind is stepped and
reported, its FLOPs follow the routing, the profile adds up, and a wrong --official path is a clear
error. Tests never import benchmarks/, and timings are never asserted (a busy machine must not fail
the suite); the measured tables are in docs/performance.md ("One command")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark run as a program

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "benchmarks" / "perf.py"
KINDS = ("vanilla", "recursive", "mor_expert", "mor_token")
TOY = ["--sections", "speed,profile", "--nr", "2", "--seq-nr", "2", "--steps", "1", "--warmup", "0",
       "--batch", "2", "--seq", "64", "--hidden", "64", "--ffn", "128", "--vocab", "256"]


def _perf(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(PERF), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_perf_reports_every_kind_at_a_toy_shape(tmp_path):
    out = tmp_path / "perf.json"
    proc = _perf([*TOY, "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    rows = res["speed"]["2"]
    assert set(rows) == set(KINDS)
    assert all(r["ms"] > 0 and r["gflop"] > 0 for r in rows.values())
    van = rows["vanilla"]["gflop"]
    assert rows["recursive"]["gflop"] == pytest.approx(van)  # all tokens through every step
    for kind in ("mor_expert", "mor_token"):  # routed steps skip tokens: fewer FLOPs, not under
        assert 0.5 * van < rows[kind]["gflop"] < van  # the prelude + coda + full first step
    assert res["peak_flops"] > 0
    for p in res["profile"].values():
        assert 0 < p["matmul_share"] < 1 and 0 < p["attention_share"] < 1
        assert sum(ms for _, ms, *_ in p["top"]) <= p["total_ms"] * (1 + 1e-9)
    for kind in KINDS:
        assert f"| 2 | {kind} | " in proc.stdout
    assert "Profile of one vanilla step" in proc.stdout and "Profile of one mor_expert step" in proc.stdout


def test_perf_official_path_errors_name_the_path(tmp_path):
    proc = _perf(["--official", str(tmp_path / "nowhere")], timeout=300)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "mixture_of_recursions" in proc.stderr
    proc = _perf(["--sections", "speed,bogus"], timeout=300)
    assert proc.returncode == 2 and "bogus" in proc.stderr
