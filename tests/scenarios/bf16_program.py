"""Multi-rank scenario: the program a GPU run executes, on CPU/gloo in bf16 (MEGAMOR_CPU_BF16=1),
under megamor's collective guard, over a multi-backend default group (`cpu:gloo,cuda:gloo`, the
shape of a GPU run's `cpu:gloo,cuda:nccl`). Two ranks, one launch, five trainers:

    pp2_bf16   PP 2 (shared layers on both stages), token-choice, loss-free balancing, bf16:
               `Trainer.train()` with a checkpoint every `--save-every` steps
    pp2_fp32   the same in fp32 (the reference the bf16 run must track)
    pp2_resume bf16, resumed from pp2_bf16's checkpoint at step `--save-every`
    tp2_bf16   TP 2, expert-choice (auxiliary inference router), bf16
    tp2_fp32   the same in fp32

    bf16_program.py --out FILE --root DIR [--steps N] [--tp-steps N] [--save-every N] [overrides]

Rank r writes FILE.r (JSON): per trainer the per-step metrics and what wraps the model (types,
parameter / main-gradient / router dtypes, router score dtypes, optimizer); then the guard's
report of the whole launch.
"""

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch

# Everything heavy is imported in main(): megatron's checkpoint writer spawns a helper process
# that imports this file again, and should not import megatron for nothing.

PP2_TC = ["parallel.pipeline_model_parallel_size=2", "routing.type=token_choice",
          "routing.balancing=loss_free"]
TP2_EC = ["parallel.tensor_model_parallel_size=2", "routing.type=expert_choice",
          "routing.causal=aux_router"]

# PP 2 x VP 2: pieces [0, 2) [2, 2) [2, 5) [5, 8): stage 0 runs layers 0-1 and 2-4 (the shared
# block's first layer in both chunks), stage 1 passes chunk 0 on and runs 5-7.
VP2 = ["parallel.virtual_pipeline_size=2", "parallel.pipeline_layers=[2,0,3,3]"]


def dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def record_router_scores(stage) -> dict:
    """Wrap each router's `route` to record the dtypes of its floating outputs."""
    seen: dict[str, set] = {}

    def wrap(name, route):
        def recorded(*args, **kwargs):
            out = route(*args, **kwargs)
            flat = [o for o in out if torch.is_tensor(o)]
            flat += [v for o in out if isinstance(o, dict) for v in o.values() if torch.is_tensor(v)]
            seen.setdefault(name, set()).update(dtype_name(t) for t in flat if t.is_floating_point())
            return out
        return recorded

    for name, router in stage.routers.items():
        router.route = wrap(name, router.route)
    return seen


def wrapping(trainer) -> dict:
    """What wraps the stage and in which dtypes it computes."""
    model, stage = trainer.engine.model, trainer.engine.stage
    chain, m = [], model
    while m is not None:
        chain.append(type(m).__name__)
        m = getattr(m, "module", None)
    router_ids = {id(p) for r in stage.routers.values() for p in r.parameters()}
    layer_params = {dtype_name(p) for p in stage.parameters() if id(p) not in router_ids}
    optimizer = trainer.engine.optimizer
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return {
        "chain": chain,
        "param_dtypes": sorted(layer_params),
        "main_grad_dtypes": sorted({dtype_name(p.main_grad) for p in stage.parameters()
                                    if getattr(p, "main_grad", None) is not None}),
        "router_params": {f"{n}.{pn}": dtype_name(p) for n, r in stage.routers.items()
                          for pn, p in r.named_parameters()},
        "router_buffers": {f"{n}.{bn}": dtype_name(b) for n, r in stage.routers.items()
                           for bn, b in r.named_buffers()},
        "optimizers": [type(o).__name__ for o in opts],
        "optimizer_bf16": [bool(o.config.bf16) for o in opts],
        "main_param_dtypes": sorted({dtype_name(p) for o in opts
                                     for g in getattr(o, "shard_fp32_from_float16_groups", [])
                                     for p in g}),
        "shared_layer_groups": sorted(trainer.dims.shared_layer_groups),
        "layers_here": sorted(int(u) for u in stage.layers),
    }


def main():
    warnings.filterwarnings("ignore")
    from megamor.shims import install_cpu_shims
    from megamor.testing import collective_guard

    install_cpu_shims()
    guard = collective_guard.install()  # before the trainer's imports: megatron captures some
    import torch.distributed as dist  # noqa: E402

    from megamor import parallel
    from megamor.config import load_config
    from megamor.training.loop import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tp-steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    # The default group a GPU run has, with gloo standing in for NCCL on the "cuda" side.
    dist.init_process_group(backend="cpu:gloo,cuda:gloo")
    probe = guard.probe(None, torch.device("cpu"))
    root, out = Path(args.root), {}
    common = [*args.overrides, "tracking.enabled=false", "tracking.depth_map_interval=0",
              "tracking.peak_flops=1e12",
              "checkpoint.save_on_signal=false", "train.log_interval=5",
              # a GPU run's default (megamor.engines.megatron.resolve_overlap): overlapped
              # gradient reduction and parameter gather
              "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]

    seconds, t0 = {}, time.perf_counter()

    def trainer(name, *over):
        nonlocal t0
        now = time.perf_counter()
        seconds[name], t0 = now - t0, now  # the previous trainer's (keyed by the next name)
        return Trainer(load_config(None, [*common, f"run.output_dir={root / name}", *over]))

    def steps(t, n):
        return [t.train_step() for _ in range(n)]

    n, k = args.steps, args.save_every
    t = trainer("pp2_bf16", *PP2_TC, "train.precision=bf16", f"train.train_steps={n}",
                f"checkpoint.save_interval={k}")
    scores = record_router_scores(t.engine.stage)
    out["pp2_bf16"] = {"history": t.train(), "wrapping": wrapping(t),
                       "scores": {r: sorted(d) for r, d in scores.items()}}
    t = trainer("pp2_fp32", *PP2_TC, "train.precision=fp32", f"train.train_steps={n}")
    out["pp2_fp32"] = {"history": steps(t, n), "wrapping": wrapping(t)}
    t = trainer("pp2_resume", *PP2_TC, "train.precision=bf16", f"train.train_steps={n}",
                f"checkpoint.resume={root / 'pp2_bf16' / 'checkpoints' / f'step_{k:08d}'}")
    out["pp2_resume"] = {"resumed_at": t.step, "history": steps(t, n - k)}
    m = args.tp_steps
    t = trainer("tp2_bf16", *TP2_EC, "train.precision=bf16", f"train.train_steps={m}")
    scores = record_router_scores(t.engine.stage)
    out["tp2_bf16"] = {"history": steps(t, m), "wrapping": wrapping(t),
                       "scores": {r: sorted(d) for r, d in scores.items()}}
    t = trainer("tp2_fp32", *TP2_EC, "train.precision=fp32", f"train.train_steps={m}")
    out["tp2_fp32"] = {"history": steps(t, m)}
    # The virtual pipeline: two chunks per rank (one empty), each in its own Float16Module.
    t = trainer("vp2_bf16", *PP2_TC, *VP2, "train.precision=bf16", f"train.train_steps={m}")
    out["vp2_bf16"] = {"history": steps(t, m), "wrapping": wrapping(t),
                       "chunks": [[type(c).__name__, type(getattr(c, "module", c)).__name__,
                                   getattr(c, "vp_stage", None)] for c in t.engine.chunks]}
    seconds["end"] = time.perf_counter() - t0
    out["seconds"] = seconds
    out["probe"] = probe
    out["backend"] = str(dist.get_backend())
    out["cpu_bf16_env"] = os.environ.get("MEGAMOR_CPU_BF16")
    out.update(guard.report())
    Path(f"{args.out}.{dist.get_rank()}").write_text(json.dumps(out))
    parallel.shutdown()


if __name__ == "__main__":
    main()
