"""The pipeline cut's cost model and `megamor plan`, checked against brute force and measurements.

Two launches: one 2-rank pipeline run (the trainer runs the predicted cut, layers process the
charged tokens) and one single process (peak resident memory against the planner's memory
model). Predicted against measured stage busy time (PP 2 and 4) and the 135m memory check live in
benchmarks/ (docs/performance.md has their numbers): timings are never asserted in tests.
"""

import itertools
import json
import random

import pytest

from conftest import run_ranks
from megamor.cli import main as cli_main
from megamor.config import load_config
from megamor.flops import LAYER_OVERHEAD, pipeline_costs
from megamor.layout import (StageCosts, balanced_cut, build_plan, circular_loads,
                            interleaved_cut, stage_pieces, stage_ranges,
                            useful_fraction)
from megamor.planner import Cluster, Layout, exposed_dp_comm, predict, rank

# A shape where matmuls dominate a CPU step; vocabulary 4096 makes the output layer weigh
# ~1.3 layers on the last stage, like 1p7b's (~1.4).
BUSY_SHAPE = ["model.preset=tiny", "model.arch=mor", "model.hidden_size=256",
              "model.num_attention_heads=4", "model.num_query_groups=2",
              "model.ffn_hidden_size=704", "model.seq_length=256", "model.vocab_size=4096",
              "train.micro_batch_size=2", "train.global_batch_size=8"]


def plan_and_costs(overrides, vocab, overhead=0.0):
    cfg = load_config(None, overrides)
    m = cfg.model
    plan = build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))
    return cfg, plan, pipeline_costs(m, plan, m.seq_length, vocab, cfg.routing, overhead)


# ----------------------------------------------------------------------------- the cut


def test_cut_minimises_the_slowest_stage_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n, p = rng.randint(2, 9), rng.randint(1, 4)
        if p > n:
            continue
        costs = StageCosts(tuple(rng.choice([1.0, 2 / 3, 1 / 3, rng.random()]) for _ in range(n)),
                           first=rng.random() * 0.2, last=rng.random() * 2)
        sizes = balanced_cut(costs, p)
        assert len(sizes) == p and sum(sizes) == n and min(sizes) >= 1
        best = min(max(costs.loads([b - a for a, b in zip((0,) + c, c + (n,))]))
                   for c in itertools.combinations(range(1, n), p - 1))
        assert max(costs.loads(sizes)) == pytest.approx(best, rel=1e-12)
    # The output layer moves layers off the last stage.
    assert balanced_cut(StageCosts((1.0,) * 8), 2) == [4, 4]
    assert balanced_cut(StageCosts((1.0,) * 8, last=2.0), 2) == [5, 3]
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4"):
        balanced_cut([1.0] * 3, 4)


def test_explicit_cut_is_honoured_and_costs_count_everything():
    cfg, plan, costs = plan_and_costs(["model.preset=1p7b"], 49152)
    assert stage_ranges(plan, 2, [3, 23], costs) == [(0, 3), (3, 26)]
    with pytest.raises(ValueError, match="needs the stage costs"):
        stage_ranges(plan, 2)
    # 1p7b: the output layer costs ~1.4 layers; routers ride on the first layer of their step.
    assert costs.last / costs.layers[0] == pytest.approx(1.41, abs=0.01)
    assert costs.layers[1] > costs.layers[2]  # step 1's first layer also runs its router
    # The target: >= 0.9 at PP 4; PP 8 reaches 0.81 contiguous (docs/architecture.md).
    assert useful_fraction(costs.loads(balanced_cut(costs, 4))) >= 0.9
    assert useful_fraction(costs.loads(balanced_cut(costs, 8))) == pytest.approx(0.81, abs=0.01)
    circ = circular_loads(plan, costs, 8)
    assert len(circ) == 8 and useful_fraction(circ) < 0.81
    # A run's default cut is this cut, with the device's layer overhead (CPU here; the trainer's
    # plan_for passes the padded vocabulary).
    from megamor.model import plan_for
    run = load_config(None, ["model.preset=1p7b", "parallel.pipeline_model_parallel_size=8"])
    cpu = plan_and_costs(["model.preset=1p7b"], 49152, LAYER_OVERHEAD["cpu"])[2]
    assert [b - a for (a, b), in plan_for(run, 49152)[1]] == balanced_cut(cpu, 8)
    run.parallel.pipeline_layers = [4, 4, 3, 3, 3, 3, 3, 3]
    assert [b - a for (a, b), in plan_for(run, 49152)[1]] == [4, 4, 3, 3, 3, 3, 3, 3]


def test_interleaved_cut_minimises_the_slowest_stage_against_brute_force():
    rng = random.Random(1)
    checked = 0
    while checked < 80:
        n, p, v = rng.randint(2, 8), rng.randint(1, 4), rng.randint(2, 3)
        if p * v > 9:
            continue
        costs = StageCosts(tuple(rng.choice([1.0, 2 / 3, 1 / 3, rng.random()]) for _ in range(n)),
                           first=rng.random() * 0.3, last=rng.random() * 2)
        sizes = interleaved_cut(costs, p, v)
        assert len(sizes) == p * v and sum(sizes) == n and min(sizes) >= 0
        assert sizes[0] >= 1 and sizes[-1] >= 1  # the embedding's and the output layer's pieces
        assert interleaved_cut(costs, p, v) == sizes  # deterministic
        best = min(max(costs.loads([b - a for a, b in zip((0,) + c, c + (n,))], p))
                   for c in itertools.combinations_with_replacement(range(n + 1), p * v - 1)
                   if c[0] >= 1 and c[-1] <= n - 1)
        assert max(costs.loads(sizes, p)) == pytest.approx(best, rel=1e-12)
        checked += 1
    # Piece j runs on stage j mod P: stage 0 holds pieces 0 and 2 here.
    assert StageCosts((1.0, 2.0, 4.0, 8.0), 0.5, 0.25).loads([1, 1, 1, 1], 2) == \
        [1.0 + 4.0 + 0.5, 2.0 + 8.0 + 0.25]
    # vp 1 is the contiguous cut; an empty middle chunk where it helps.
    costs = StageCosts((1.0,) * 6, last=2.0)
    assert interleaved_cut(costs, 2, 1) == balanced_cut(costs, 2)
    assert max(costs.loads(interleaved_cut(costs, 2, 2), 2)) == 4.0
    with pytest.raises(ValueError, match="cannot cut 1 layer.* into 2 x 2 interleaved pieces"):
        interleaved_cut(StageCosts((1.0,)), 2, 2)
    with pytest.raises(ValueError, match="vp=0 must be integers >= 1"):
        interleaved_cut(costs, 2, 0)
    with pytest.raises(ValueError, match="costs must be >= 0"):
        interleaved_cut(StageCosts((1.0, -1.0)), 1, 2)


def test_interleaved_cut_reaches_0p9_at_pp8_for_1p7b():
    """Issue 21 item 5: PP 8 at >= 0.9 useful for 1p7b (GPU costs: FLOPs, no layer overhead).
    A contiguous cut stops at 0.81 (above); the interleaved cut of the unrolled plan over
    8 x 2 pieces, empty chunks allowed, reaches 0.92."""
    _, plan, costs = plan_and_costs(["model.preset=1p7b"], 49152)
    sizes = interleaved_cut(costs, 8, 2)
    assert useful_fraction(costs.loads(sizes, 8)) == pytest.approx(0.923, abs=0.001)
    assert 0 in sizes[1:-1]  # it needs an empty chunk (0.879 with every chunk non-empty)
    pieces = stage_pieces(plan, 8, 2, None, costs)
    assert [[b - a for a, b in mine] for mine in pieces] == \
        [[sizes[p], sizes[8 + p]] for p in range(8)]
    assert useful_fraction(costs.loads(interleaved_cut(costs, 4, 2), 4)) > 0.97
    # The trainer's default interleaved cut is this cut at the device's costs.
    from megamor.model import plan_for
    run = load_config(None, ["model.preset=1p7b", "parallel.pipeline_model_parallel_size=8",
                             "parallel.virtual_pipeline_size=2", "train.device=cpu"])
    cpu = plan_and_costs(["model.preset=1p7b"], 49152, LAYER_OVERHEAD["cpu"])[2]
    got = plan_for(run, 49152)[1]
    assert [len(mine) for mine in got] == [2] * 8
    want = interleaved_cut(cpu, 8, 2)
    assert [[b - a for a, b in mine] for mine in got] == [[want[p], want[8 + p]] for p in range(8)]
    assert useful_fraction(cpu.loads(want, 8)) > 0.95


# ----------------------------------------------------------------------------- measurements


@pytest.mark.slow
def test_trainer_runs_the_cost_balanced_cut_at_pp2(tmp_path, builtin_root):
    """A 2-stage expert-choice run: the trainer runs the cut the cost model chose, and every
    layer processed the tokens the cost model charged it for. (Predicted against measured
    per-stage busy time is a timing comparison: it lives in benchmarks/pipeline_balance.py,
    with its figures in docs/performance.md, not in a test that a busy machine could fail.)"""
    out = tmp_path / "busy.json"
    run_ranks(2, "stage_busy.py", ["--out", str(out), "--warmup", "0", "--steps", "1",
                                   *BUSY_SHAPE, "parallel.pipeline_model_parallel_size=2",
                                   f"data.builtin_root={builtin_root}",
                                   f"run.output_dir={tmp_path / 'run'}"])
    got = json.loads(out.read_text())
    _, plan, costs = plan_and_costs(BUSY_SHAPE, got["vocab_size"], LAYER_OVERHEAD["cpu"])
    sizes = balanced_cut(costs, 2)
    assert [b - a for a, b in got["ranges"]] == sizes  # the trainer ran the cost-balanced cut
    assert all(s["compute_cpu_best"] > 0 for s in got["stages"])  # both stages were measured
    # Expert-choice: the tokens each layer processed are the cost model's expected counts.
    from megamor.flops import expected_layer_tokens
    assert got["layer_tokens"] == [t * 8 for t in expected_layer_tokens(plan, 256)]


@pytest.mark.slow
def test_planner_memory_matches_measured_rss(tmp_path, builtin_root):
    """Peak RSS a tiny fp32 run adds on one CPU process, against the planner, within 15%."""
    shape = ["model.preset=tiny", "model.seq_length=512", "train.micro_batch_size=16",
             "train.global_batch_size=16"]
    out = tmp_path / "mem.json"
    run_ranks(1, "memory_probe.py", ["--out", str(out), *shape, f"data.builtin_root={builtin_root}",
                                     f"run.output_dir={tmp_path / 'run'}"])
    got = json.loads(out.read_text())
    cfg = load_config(None, shape)
    pred = predict(cfg, Layout(1, 1, 1, 16), 512, 16, Cluster(), got["vocab_size"], "fp32")
    measured_gib = got["added_bytes"] / 2**30
    assert pred.memory["total"] == pytest.approx(measured_gib, rel=0.15), (pred.memory, measured_gib)


# ----------------------------------------------------------------------------- the planner


def test_ranking_is_sane():
    cfg = load_config(None, ["model.preset=1p7b"])
    cluster = Cluster(nodes=2)
    preds = rank(cfg, 2048, 256, cluster)
    fitting = [p for p in preds if p.fits]
    assert fitting and all(p.memory["total"] <= 80 * 0.9 for p in fitting)
    assert [p.step_s for p in fitting] == sorted(p.step_s for p in fitting)
    assert all(not p.fits for p in preds[len(fitting):])
    by = {p.layout: p for p in preds}
    base = Layout(1, 1, 16, 4)
    # Recompute trades memory for time; sharding trades memory across data parallel.
    full = by[Layout(1, 1, 16, 4, "full")]
    assert full.memory["activations"] < 0.5 * by[base].memory["activations"]  # logits stay
    assert full.step_s > by[base].step_s
    z = [by[Layout(1, 1, 16, 4, "none", e)].memory for e in ("megatron", "zero1", "zero2", "zero3")]
    assert z[3]["weights"] < z[2]["weights"] and z[2]["grads"] < z[1]["grads"]
    assert z[0]["optimizer"] == pytest.approx(z[1]["optimizer"])
    # Tensor parallel without sequence parallelism does not halve activations (4h stays whole).
    tp2 = by[Layout(2, 1, 8, 4)].memory["activations"] / by[base].memory["activations"]
    assert 0.5 < tp2 < 0.75
    # Larger micro-batches hold more activations; a pipeline keeps several in flight.
    assert by[Layout(1, 1, 16, 8)].memory["activations"] > by[base].memory["activations"]
    assert by[Layout(1, 2, 8, 4)].parts["bubble"] > 0 == by[base].parts["bubble"]
    # A bigger GPU fits at least as many layouts.
    assert sum(p.fits for p in rank(cfg, 2048, 256, Cluster(nodes=2, gpu_memory_gb=20))) < len(fitting)


def test_overlap_charges_only_the_data_parallel_sync_it_does_not_hide():
    cfg = load_config(None, ["model.preset=1p7b"])
    cluster = Cluster(nodes=8)
    for lay in (Layout(1, 1, 64, 4), Layout(2, 1, 32, 4), Layout(2, 2, 16, 4)):
        on = predict(cfg, lay, 2048, 256, cluster)
        off = predict(cfg, lay, 2048, 256, cluster, overlap=False)
        assert off.parts["dp"] == off.parts["dp_total"] == on.parts["dp_total"] > 0
        assert 0 < on.parts["dp"] < off.parts["dp"]
        assert off.step_s - on.step_s == pytest.approx(off.parts["dp"] - on.parts["dp"])
        assert on.parts["shared"] == off.parts["shared"]  # after the reduction: never hidden
    zero = Layout(1, 1, 64, 4, "none", "zero2")  # DeepSpeed: charged in full
    assert predict(cfg, zero, 2048, 256, cluster).parts["dp"] == \
        predict(cfg, zero, 2048, 256, cluster, overlap=False).parts["dp"]
    # No compute to hide behind: all of it shows; ample compute: the first stage's last bucket
    # (40M of 400M parameters) shows; a later stage's single bucket: its gather shows.
    assert exposed_dp_comm(1.0, 0.5, 400e6, 0, 8, 0.0) == 1.5
    assert exposed_dp_comm(1.0, 0.5, 400e6, 0, 8, 100.0) == pytest.approx(0.15)
    assert exposed_dp_comm(1.0, 0.5, 400e6, 1, 8, 100.0) == 0.5


def test_plan_cli_prints_a_table_and_rejects_bad_input(capsys):
    assert cli_main(["plan", "--preset", "tiny", "--gbs", "16", "--top", "3",
                     "--engines", "megatron", "--seq", "128", "model.vocab_size=1024"]) == 0
    text = capsys.readouterr().out
    assert "tp pp vp   dp mbs recompute" in text and text.count("megatron") == 3
    # Issue 19 item 7: the columns explained, the first row as options
    assert "columns: tp, pp, dp = tensor, pipeline, data parallel sizes" in text
    assert "row 1 as overrides (megamor pretrain, megamor.launch.slurm): parallel.tensor_model_parallel_size=" in text
    assert "train.global_batch_size=16" in text
    # a preset with a Slurm script: its sbatch line; the batch defaults to the preset's (256)
    assert cli_main(["plan", "--preset", "1p7b", "--nodes", "8", "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "global batch 256 sequences" in text
    line = next(l for l in text.splitlines() if l.startswith("row 1 as a Slurm job: "))
    assert line.endswith("MEGAMOR_GBS=256 sbatch --nodes=8 slurm/pretrain_1p7b.sh")
    with pytest.raises(SystemExit, match="model.preset='nope' is unknown"):
        cli_main(["plan", "--preset", "nope"])
    # tiny allows tp <= 2 and pp <= 8, so 32 GPUs need dp >= 2, which a batch of 3 cannot feed.
    with pytest.raises(SystemExit, match="no layout of 4 node.* x 8 GPUs"):
        cli_main(["plan", "--preset", "tiny", "--nodes", "4", "--gbs", "3", "model.vocab_size=1024"])
    with pytest.raises(SystemExit, match="needs the vocabulary size: set model.vocab_size"):
        cli_main(["plan", "--preset", "tiny"])
    assert cli_main(["plan", "--preset", "1p7b", "--gpu-memory-gb", "1"]) == 1
    assert "no layout fits" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--gpus-per-node=0 must be >= 1"):
        cli_main(["plan", "--preset", "1p7b", "--gpus-per-node", "0"])
    with pytest.raises(SystemExit, match="--engines: unknown zero9"):
        cli_main(["plan", "--preset", "1p7b", "--engines", "zero9"])
    # --pp: only those pipelines; an interleaved row 1 carries its virtual pipeline size
    assert cli_main(["plan", "--preset", "1p7b", "--nodes", "8", "--pp", "8", "--top", "2"]) == 0
    text = capsys.readouterr().out
    rows = [l.split() for l in text.splitlines() if l[:3].strip() in ("1", "2")]
    assert [r[2:4] for r in rows] == [["8", "2"], ["8", "2"]]  # pp 8, vp 2
    assert "parallel.virtual_pipeline_size=2" in text
    with pytest.raises(SystemExit, match="--pp='x'"):
        cli_main(["plan", "--preset", "1p7b", "--pp", "x"])


def test_planner_ranks_the_interleaved_pipeline():
    """Issue 21 item 5: at PP 8 (1p7b, 8 nodes) the interleaved schedule over the 8 x 2 cut
    beats the contiguous cut on stage balance and bubble, and `megamor plan` ranks it first."""
    from megamor.planner import candidates, layout_overrides, peak_in_flight, sbatch_line
    cfg = load_config(None, ["model.preset=1p7b"])
    cluster = Cluster(nodes=8)
    one, two = (predict(cfg, Layout(1, 8, 8, 4, vp=v), 2048, 256, cluster) for v in (1, 2))
    assert one.stage_balance == pytest.approx(0.81, abs=0.01)
    assert two.stage_balance == pytest.approx(0.923, abs=0.001)
    assert two.parts["bubble"] < one.parts["bubble"] and two.step_s < one.step_s
    assert len(two.sizes) == 16 and sum(two.sizes) == 26
    # more micro-batches in flight under interleaving (megatron's warm-up), so more activations
    assert two.memory["activations"] > one.memory["activations"]
    preds = rank(cfg, 2048, 256, cluster, pipelines=[8])
    assert {p.layout.pp for p in preds} == {8} and {p.layout.vp for p in preds} == {1, 2, 3}
    assert preds[0].layout.vp == 2
    assert all(p.layout.engine == "megatron" for p in preds if p.layout.vp > 1)
    # validation's refusals are skipped: 256 / (16 x 8) = 2 micro-batches, not a multiple of 8
    lays = candidates(cfg, 2048, 256, cluster, pipelines=[8])
    assert Layout(1, 8, 8, 16, vp=1) in lays and Layout(1, 8, 8, 16, vp=2) not in lays
    # the layout's options round-trip through start-up validation
    best = preds[0].layout
    run = load_config(None, ["model.preset=1p7b", *layout_overrides(best, 256, 2048, cfg)])
    run.validate(world_size=64)
    assert run.parallel.virtual_pipeline_size == 2
    assert run.parallel.pipeline_model_parallel_size == 8
    assert "parallel.virtual_pipeline_size=2" in best.overrides()
    opts = [o for o in best.overrides() if "data_parallel" not in o]
    load_config(None, ["model.preset=1p7b", *opts]).validate(world_size=64)
    assert "slurm/pretrain_1p7b.sh parallel.virtual_pipeline_size=2" in \
        sbatch_line(best, 256, 2048, cfg, 8)
    assert "virtual" not in " ".join(layout_overrides(Layout(1, 8, 8, 4), 256, 2048, cfg))
    # An explicit parallel.pipeline_layers of pp x vp pieces is what the plan costs.
    mine = [2, 2, 2, 2, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    fixed = load_config(None, ["model.preset=1p7b", f"parallel.pipeline_layers={mine}",
                               "parallel.pipeline_model_parallel_size=8",
                               "parallel.virtual_pipeline_size=2"])
    got = predict(fixed, Layout(1, 8, 8, 4, vp=2), 2048, 256, cluster)
    assert got.sizes == mine and got.stage_balance < two.stage_balance
    # Activations in flight: 1F1B keeps P - p micro-batches; interleaved, megatron's warm-up
    # 2 (P - p - 1) + (V - 1) P chunk passes plus the one the steady state adds.
    assert peak_in_flight([1.0], 4, 0, 8) == 4 and peak_in_flight([1.0], 4, 3, 8) == 1
    assert peak_in_flight([1.0, 1.0], 4, 0, 8) == 11 and peak_in_flight([1.0, 1.0], 4, 3, 8) == 5
    assert peak_in_flight([1.0, 1.0], 4, 0, 4) == 8  # all in warm-up
    # the last stage with an empty first chunk (the 1p7b cut's stage 7) holds one at a time
    assert peak_in_flight([0.0, 1.0], 4, 3, 8) == 1
    assert peak_in_flight([1.0, 0.0], 4, 3, 8) == 5
