"""Pipeline balance on CPU: the cost model's predicted stage loads against measured ones.

    python benchmarks/pipeline_balance.py [--pp 2,4] [--vp 1,2] [--steps 4] [--overhead] [--json FILE]

For each pipeline size, launches that many gloo ranks of tests/scenarios/stage_busy.py (a
trainer-level expert-choice run on a shape where matmuls dominate: hidden 256, sequence 256,
vocabulary 4096, micro-batch 2, 4 micro-batches) and prints, per stage, the predicted load
(megamor.flops.pipeline_costs with the CPU layer overhead) and the measured forward+backward CPU
seconds (best call over the measured steps), both relative to the slowest stage, and the useful
fraction (mean / max) of each. `--vp 1,2`: each pipeline size also as megatron's interleaved
schedule with that many chunks per stage (the default interleaved cut; a stage's CPU seconds are
its chunks' together). `--overhead` measures the CPU layer overhead the cost model uses
(`layer_overhead`: one unrolled layer per stage, 8 ranks).
Results in docs/performance.md ("Pipeline balance").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = ["model.preset=tiny", "model.arch=mor", "model.hidden_size=256",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=704",
         "model.seq_length=256", "model.vocab_size=4096", "train.micro_batch_size=2",
         "train.global_batch_size=8"]


def _env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def measure(pp: int, steps: int, tmp: Path, vp: int = 1) -> dict:
    out = tmp / f"pp{pp}vp{vp}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pp}",
           str(ROOT / "tests" / "scenarios" / "stage_busy.py"), "--out", str(out), "--steps",
           str(steps), *SHAPE, f"parallel.pipeline_model_parallel_size={pp}",
           f"parallel.virtual_pipeline_size={vp}",
           f"data.builtin_root={tmp / 'builtin'}", f"run.output_dir={tmp / f'run{pp}-{vp}'}"]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def predicted(result: dict) -> list[float]:
    from megamor.config import load_config
    from megamor.flops import LAYER_OVERHEAD, pipeline_costs
    from megamor.layout import build_plan

    cfg = load_config(None, SHAPE)
    m = cfg.model
    plan = build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))
    costs = pipeline_costs(m, plan, m.seq_length, result["vocab_size"], cfg.routing,
                           LAYER_OVERHEAD["cpu"])
    pieces = result["pieces"]  # per stage, its chunks' [start, stop); execution order below
    order = [pieces[j % len(pieces)][j // len(pieces)] for j in range(len(pieces) * len(pieces[0]))]
    return costs.loads([b - a for a, b in order], len(pieces))


def balance(pp: int, steps: int, tmp: Path, vp: int = 1) -> dict:
    """One trainer-level PP run: per-stage predicted loads and measured CPU seconds."""
    got = measure(pp, steps, tmp, vp)
    return {"ranges": got["ranges"], "pieces": got["pieces"], "predicted": predicted(got),
            "measured_s": [s["compute_cpu_best"] for s in got["stages"]], "stages": got["stages"]}


def format_balance(pp: int, r: dict, vp: int = 1) -> list[str]:
    from megamor.layout import useful_fraction

    pred, meas = r["predicted"], r["measured_s"]
    cut = ([b - a for a, b in r["ranges"]] if vp == 1 else
           " / ".join(" ".join(str(b - a) for a, b in mine) for mine in r["pieces"]))
    return [f"PP {pp}" + (f" x VP {vp}: chunk layers per stage {cut}" if vp > 1
                          else f": layers per stage {cut}"),
            f"  predicted load / max   {' '.join(f'{x / max(pred):6.3f}' for x in pred)}"
            f"   useful {useful_fraction(pred):.3f}",
            f"  measured CPU s / max   {' '.join(f'{x / max(meas):6.3f}' for x in meas)}"
            f"   useful {useful_fraction(meas):.3f}"
            f"   ({' '.join(f'{x:.3f}' for x in meas)} s per step)"]


def layer_overhead(steps: int, tmp: Path) -> dict:
    """The CPU layer overhead from one unrolled layer per stage (PP 8 of the 8-layer shape):
    stages 0-2 run one full-length layer each, stages 5-6 one layer of recursion step 3 (a third
    of the tokens), the last stage the coda layer and the output layer, so output time = last -
    mean(first three). With A = 1 + proportional + fixed (a full layer's time per FLOP against
    the output matmul's) and r = a third-token layer's FLOPs / a full layer's:
        A = (output FLOPs / layer FLOPs) x (layer time / output time)
        (A - fixed) r + fixed = A x (third-token layer time / layer time)."""
    got = measure(8, steps, tmp)
    t = [s["compute_cpu_best"] for s in got["stages"]]
    from megamor.config import load_config
    from megamor.flops import pipeline_costs
    from megamor.layout import build_plan

    cfg = load_config(None, SHAPE)
    m = cfg.model
    plan = build_plan(m.arch, m.num_layers, m.num_recursions, m.sharing,
                      cfg.routing.capacities(m.num_recursions))
    costs = pipeline_costs(m, plan, m.seq_length, got["vocab_size"], cfg.routing)
    layer, third = sum(t[:3]) / 3, (t[5] + t[6]) / 2
    output = t[-1] - layer
    a = costs.last / costs.layers[0] * layer / output
    r = (costs.layers[5] + costs.layers[6]) / 2 / costs.layers[0]
    fixed = (a * third / layer - a * r) / (1 - r)
    return {"stage_cpu_s": t, "layer_s": layer, "third_s": third, "output_s": output,
            "output_flops_in_layers": costs.last / costs.layers[0],
            "proportional": a - fixed - 1.0, "fixed": fixed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--vp", default="1", help="chunks per stage to run each PP with, e.g. 1,2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--overhead", action="store_true", help="also measure the CPU layer overhead")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.overhead:
            r = report["overhead"] = layer_overhead(args.steps, tmp)
            print(f"PP 8, CPU s per stage: {' '.join(f'{x:.3f}' for x in r['stage_cpu_s'])}")
            print(f"full layer {r['layer_s']:.3f} s, third-token layer {r['third_s']:.3f} s, "
                  f"output layer {r['output_s']:.3f} s for {r['output_flops_in_layers']:.2f} "
                  f"layers' FLOPs -> layer overhead proportional {r['proportional']:.2f}, fixed "
                  f"{r['fixed']:.2f} (megamor.flops.LAYER_OVERHEAD['cpu'])")
        for pp in [int(x) for x in args.pp.split(",")]:
            for vp in [int(x) for x in args.vp.split(",")]:
                r = report[f"pp{pp}" + (f"vp{vp}" if vp > 1 else "")] = balance(pp, args.steps,
                                                                                 tmp, vp)
                print("\n".join(format_balance(pp, r, vp)))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
