"""Overlapped data-parallel communication (parallel.overlap_grad_reduce / overlap_param_gather):
training equals the same training without overlap, and resumes across the two; the GPU default
is pinned without a GPU.

The multi-rank runs (tests/scenarios/overlap_runs.py, one launch of 4 gloo ranks) compare bitwise:
overlap changes when each bucket's collective runs, not what it sums.
"""

import json

import pytest
import torch

from conftest import run_ranks
from megamor.config import ConfigError, load_config
from megamor.engines.megatron import ddp_config, resolve_overlap


def _curve(run: dict) -> list:
    return [(h["step"], h["loss"], h["grad_norm"]) for h in run["history"]]


@pytest.mark.slow
def test_overlap_equals_no_overlap_and_resumes_across(tmp_path, builtin_root):
    out = tmp_path / "overlap.json"
    run_ranks(4, "overlap_runs.py", ["--out", str(out), f"data.builtin_root={builtin_root}",
                                     f"run.output_dir={tmp_path / 'run'}",
                                     "tracking.peak_flops=1e12"])
    r = json.loads(out.read_text())
    # PP 2 x DP 2: shared recursion layers and the tied embedding live on both stages, so the
    # cross-stage sum of their gradients runs after overlapped reduce-scatters / all-reduces.
    assert r["pp2_off"]["shared_layers"] and r["pp2_off"]["embedding_group"]
    pairs = [("pp2_off", "pp2_on"),            # distributed optimizer, both overlaps
             ("pp2_adam_off", "pp2_adam_on"),  # all-reduce, overlap_grad_reduce
             ("tp2_off", "tp2_on"),            # TP 2 x DP 2, no pipeline
             ("tp2_sp_off", "tp2_sp_on"),      # the same with sequence parallelism
             ("pp2_off", "off_then_on"),       # 2 steps without overlap, resumed with it
             ("pp2_off", "on_then_off")]       # and the other way round
    for ref, got in pairs:
        assert _curve(r[got]) == _curve(r[ref]), (ref, got)
        assert r[got]["weights"] == r[ref]["weights"], (ref, got)
    assert [s for s, _, _ in _curve(r["off_then_on"])] == [1, 2, 3, 4]
    # megatron's DDP was built as asked (an "on" equal to "off" because the options were lost
    # on the way would pass the comparisons above).
    for name in ("pp2_on", "tp2_on", "tp2_sp_on"):
        assert r[name]["overlap"] == [True, True], name
    assert r["pp2_adam_on"]["overlap"] == [True, False]
    for name in ("pp2_off", "pp2_adam_off", "tp2_off", "tp2_sp_off"):
        assert r[name]["overlap"] == [False, False], name
    assert r["off_then_on"]["overlap"] == [[False, False], [True, True]]
    assert r["on_then_off"]["overlap"] == [[True, True], [False, False]]
    # The optimizers agree with each other too (not bitwise: different reduction order).
    for (s1, l1, _), (s2, l2, _) in zip(_curve(r["pp2_off"]), _curve(r["pp2_adam_off"])):
        assert l1 == pytest.approx(l2, rel=1e-5)


def _parallel(*overrides):
    return load_config(None, list(overrides)).parallel


def test_overlap_defaults_on_for_gpu_off_for_cpu():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_overlap(_parallel(), gpu) == (True, True)
    assert resolve_overlap(_parallel(), cpu) == (False, False)
    # Without the distributed optimizer there is no parameter gather to overlap.
    no_dist_opt = _parallel("parallel.use_distributed_optimizer=false")
    assert resolve_overlap(no_dist_opt, gpu) == (True, False)
    # Explicit settings win on either device (gloo runs the asynchronous collectives).
    on = ("parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")
    off = ("parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false")
    assert resolve_overlap(_parallel(*on), cpu) == (True, True)
    assert resolve_overlap(_parallel(*off), gpu) == (False, False)
    # What megatron's DDP is given for a GPU run (the real config class, not a stand-in).
    c = ddp_config(_parallel(), gpu)
    assert (c.overlap_grad_reduce, c.overlap_param_gather, c.use_distributed_optimizer,
            c.grad_reduce_in_fp32) == (True, True, True, True)
    c = ddp_config(_parallel(), cpu)
    assert (c.overlap_grad_reduce, c.overlap_param_gather) == (False, False)


def test_overlap_param_gather_needs_the_distributed_optimizer():
    cfg = load_config(None, ["parallel.overlap_param_gather=true",
                             "parallel.use_distributed_optimizer=false"])
    with pytest.raises(ConfigError, match="parallel.use_distributed_optimizer=true"):
        cfg.validate()
    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.overlap_grad_reduce=true"])
    with pytest.raises(ConfigError, match="overlap_comm"):
        cfg.validate()
