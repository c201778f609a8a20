"""Multi-rank scenario: how busy each pipeline stage really is.

    torchrun --nproc-per-node=P stage_busy.py --out FILE [--warmup 1] [--steps 3] [overrides]

Times megatron's per-micro-batch `forward_step` and `backward_step` (the compute of a stage;
point-to-point waits happen outside them) with the thread's CPU clock and the wall clock, and the
whole forward/backward schedule of each step. CPU time is what the stage computed even when
more ranks than cores share the machine; the wall clock also holds waiting for a core. Other
processes on a shared machine still slow some calls down (caches, memory bandwidth), so
`compute_cpu_best` sums, over the calls of a step, each call's fastest time across the measured
steps (the schedule makes the same calls in the same order every step). Rank 0 writes, per
pipeline stage: mean and best compute seconds per step, the mean schedule and step wall seconds.
"""

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist
import megatron.core.pipeline_parallel as pipeline_parallel
from megatron.core.pipeline_parallel import schedules

from megamor import parallel
from megamor.config import load_config
from megamor.training.loop import Trainer

CLOCK = {"cpu": 0.0, "wall": 0.0, "schedule": 0.0}
CALLS: list[float] = []  # CPU seconds of every compute call, in order


def timed(fn, clock):
    def wrapper(*args, **kwargs):
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu = time.thread_time() - c0
            CALLS.append(cpu)
            clock["cpu"] += cpu
            clock["wall"] += time.perf_counter() - w0
    return wrapper


def timed_schedule(get_func):
    def get(*args, **kwargs):
        run = get_func(*args, **kwargs)

        def schedule(*a, **k):
            w0 = time.perf_counter()
            try:
                return run(*a, **k)
            finally:
                CLOCK["schedule"] += time.perf_counter() - w0
        return schedule
    return get


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    schedules.forward_step = timed(schedules.forward_step, CLOCK)
    schedules.backward_step = timed(schedules.backward_step, CLOCK)
    pipeline_parallel.get_forward_backward_func = timed_schedule(pipeline_parallel.get_forward_backward_func)
    cfg = load_config(None, ["tracking.enabled=false", "train.warmup_steps=0",
                             "train.lr_schedule=constant", *args.overrides,
                             f"train.train_steps={args.warmup + args.steps}"])
    trainer = Trainer(cfg)
    for _ in range(args.warmup):
        trainer.train_step()
    dist.barrier()
    for k in CLOCK:
        CLOCK[k] = 0.0
    CALLS.clear()
    steps = [trainer.train_step()["seconds"] for _ in range(args.steps)]
    per_step = len(CALLS) // args.steps
    best = sum(min(CALLS[s * per_step + i] for s in range(args.steps)) for i in range(per_step))
    mine = {"pp_rank": trainer.dims.pp_rank, "tp_rank": trainer.dims.tp_rank,
            "dp_rank": trainer.dims.dp_rank, "compute_cpu": CLOCK["cpu"] / args.steps,
            "compute_cpu_best": best,
            "compute_wall": CLOCK["wall"] / args.steps, "schedule_wall": CLOCK["schedule"] / args.steps,
            "step_wall": sum(steps) / args.steps}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        stages = sorted((r for r in everyone if r["tp_rank"] == 0 and r["dp_rank"] == 0),
                        key=lambda r: r["pp_rank"])
        result = {"ranges": [mine[0] for mine in trainer.engine.pieces], "pieces": trainer.engine.pieces, "vocab_size": trainer.vocab_size,
                  "num_microbatches": trainer.engine.num_microbatches, "stages": stages,
                  "layer_tokens": trainer.history[-1]["layer_tokens"]}
        with open(args.out, "w") as f:
            json.dump(result, f)
    parallel.shutdown()


if __name__ == "__main__":
    main()
