"""benchmarks/perf.py's core at a toy shape, in this process: every kind is stepped and reported,
its FLOPs follow the routing, the profile adds up, and a wrong --official path is a clear error.
Timings are never asserted (a busy machine must not fail the suite); the measured tables are in
docs/performance.md ("One command")."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import perf  # noqa: E402

TOY = ["--sections", "speed,profile", "--nr", "2", "--seq-nr", "2", "--steps", "1", "--warmup", "0",
       "--batch", "2", "--seq", "64", "--hidden", "64", "--ffn", "128", "--vocab", "256"]


def test_perf_reports_every_kind_at_a_toy_shape():
    args = perf.parse(TOY)
    res = perf.run(args)
    rows = res["speed"][2]
    assert set(rows) == set(perf.KINDS)
    assert all(r["ms"] > 0 and r["gflop"] > 0 for r in rows.values())
    van = rows["vanilla"]["gflop"]
    assert rows["recursive"]["gflop"] == pytest.approx(van)  # all tokens through every step
    for kind in ("mor_expert", "mor_token"):  # routed steps skip tokens: fewer FLOPs, not under
        assert 0.5 * van < rows[kind]["gflop"] < van  # the prelude + coda + full first step
    assert 1e9 < res["peak_flops"] < 1e14
    for p in res["profile"].values():
        assert 0 < p["matmul_share"] < 1 and 0 < p["attention_share"] < 1
        assert sum(ms for _, ms, _ in p["top"]) <= p["total_ms"] * (1 + 1e-9)
    text = perf.report(args, res)
    for kind in perf.KINDS:
        assert f"| 2 | {kind} | " in text
    assert "Profile of one vanilla step" in text and "Profile of one mor_expert step" in text


def test_perf_official_path_errors_name_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        perf.parse(["--official", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "nowhere" in err and "mixture_of_recursions" in err
    with pytest.raises(SystemExit):
        perf.parse(["--sections", "speed,bogus"])
    assert "bogus" in capsys.readouterr().err
