"""Multi-rank scenario (4 ranks): training with the data-parallel communication overlapped
(parallel.overlap_grad_reduce / overlap_param_gather) against the same training without it, in
one launch of the ranks, and resumes across the two.

Runs (MoR expert-choice, tiny preset), each in its own run directory:
- PP 2 x DP 2 (shared recursion layers and the tied embedding on both stages): distributed
  optimizer with overlap off / on (both), torch DDP all-reduce (no distributed optimizer) with
  overlap_grad_reduce off / on;
- TP 2 x DP 2: distributed optimizer with overlap off / on, without and with sequence parallelism;
- resume at PP 2 x DP 2: 2 steps with overlap off, then resumed to the end with overlap on, and
  the other way round.
Rank 0 writes a JSON file: per run, its history and the fingerprint of every weight of every
rank after the run (sum and sum of squares, float64), the stages holding shared copies, and the
overlap settings megatron's DDP was built with. No depth maps: their forward would gather the
weights before each save, which must do it itself (`MegatronEngine.sync_params`).
"""

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.loop import Trainer  # noqa: E402

PP2 = ["parallel.pipeline_model_parallel_size=2"]
TP2 = ["parallel.tensor_model_parallel_size=2"]
ON = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
OFF = ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
ADAM = ["parallel.use_distributed_optimizer=false"]
SP = ["parallel.sequence_parallel=true"]
RUNS = {
    "pp2_off": PP2 + OFF, "pp2_on": PP2 + ON,
    "pp2_adam_off": PP2 + ADAM + OFF,
    "pp2_adam_on": PP2 + ADAM + ["parallel.overlap_grad_reduce=true"],
    "tp2_off": TP2 + OFF, "tp2_on": TP2 + ON,
    "tp2_sp_off": TP2 + SP + OFF, "tp2_sp_on": TP2 + SP + ON,
}
RESUMES = {"off_then_on": (OFF, ON), "on_then_off": (ON, OFF)}


def fingerprint(trainer) -> dict:
    """Every weight of every rank: (sum, sum of squares) in float64, keyed by rank and name."""
    dims = trainer.dims
    mine = {f"pp{dims.pp_rank}.tp{dims.tp_rank}.dp{dims.dp_rank}.{n}":
            [p.detach().double().sum().item(), p.detach().double().square().sum().item()]
            for n, p in trainer.engine.stage.named_parameters()}
    every = [None] * dims.world_size
    dist.all_gather_object(every, mine)
    return {k: v for d in every for k, v in d.items()}


def run(base: list, overrides: list, out: Path, steps: int) -> dict:
    cfg = load_config(None, [*base, *overrides, f"train.train_steps={steps}",
                             f"run.output_dir={out}"])
    trainer = Trainer(cfg)
    hist = trainer.train()
    shared = sorted(trainer.dims.shared_layer_groups)
    ddp = trainer.engine.model.ddp_config
    return {"history": hist, "weights": fingerprint(trainer), "shared_layers": shared,
            "embedding_group": trainer.dims.embedding_group is not None,
            "overlap": [ddp.overlap_grad_reduce, ddp.overlap_param_gather]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", default=",".join([*RUNS, *RESUMES]))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = ["model.preset=tiny", "model.seq_length=64", "model.arch=mor",
            "routing.type=expert_choice", "train.warmup_steps=1", "train.lr_schedule=constant",
            "train.lr=0.003", "train.micro_batch_size=2", "train.global_batch_size=8",
            "tracking.depth_map_interval=0", *args.overrides]
    out_dir = Path(next((o.split("=", 1)[1] for o in reversed(args.overrides)
                         if o.startswith("run.output_dir=")), "runs/overlap_runs"))
    results = {}
    wanted = args.runs.split(",")
    for name, overrides in RUNS.items():
        if name in wanted:
            results[name] = run(base, overrides, out_dir / name, args.steps)
    half = args.steps // 2
    for name, (first, then) in RESUMES.items():
        if name not in wanted:
            continue
        first_run = run(base, PP2 + first, out_dir / name, half)
        resumed = run(base, PP2 + then + ["checkpoint.resume=auto"], out_dir / name, args.steps)
        results[name] = {"history": first_run["history"] + resumed["history"],
                         "weights": resumed["weights"],
                         "overlap": [first_run["overlap"], resumed["overlap"]]}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    parallel.shutdown()


if __name__ == "__main__":
    main()
