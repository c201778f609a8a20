"""Step time with and without overlapped data-parallel communication (parallel.overlap_grad_reduce
+ overlap_param_gather), DP 2 on this machine's CPUs over gloo, side by side in one launch.

The trainer's own step (megamor.training.loop.Trainer.train_step: forward/backward through
megatron's schedule, gradient reduction, clip + AdamW with the distributed optimizer) is timed.
Blocks of `--steps` steps alternate between overlap off and on for `--rounds` rounds (a fresh
trainer per block, its first step not timed), so machine noise hits both alike; the median step
of each setting and the ratio on / off are printed, with the gradient bytes each rank reduces.

    python benchmarks/overlap.py                         # 135m preset, seq 128, 2 ranks
    python benchmarks/overlap.py --preset tiny --seq 64  # quick

Run it as a plain script: it starts its 2 ranks itself (torchrun), one thread each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="135m")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per step and rank")
    ap.add_argument("--steps", type=int, default=4, help="steps per block (first not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    return ap.parse_args()


def block(args, overlap: bool, out: Path) -> list[float]:
    from megamor.config import load_config
    from megamor.training.loop import Trainer
    flag = "true" if overlap else "false"
    cfg = load_config(None, [
        f"model.preset={args.preset}", f"model.seq_length={args.seq}",
        f"train.micro_batch_size={args.mbs}",
        f"train.global_batch_size={args.mbs * args.micro * 2}",
        f"train.train_steps={args.steps}", "train.warmup_steps=1", "tracking.enabled=false",
        "tracking.peak_flops=1e12", f"parallel.overlap_grad_reduce={flag}",
        f"parallel.overlap_param_gather={flag}", f"run.output_dir={out}"])
    trainer = Trainer(cfg)
    times = []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in trainer.engine.stage.parameters())
    finally:
        trainer.data.close()
    return times[1:], params


def ranks(args) -> None:
    import torch.distributed as dist
    from megamor import parallel
    root = Path(args.out or tempfile.mkdtemp(prefix="megamor-overlap-"))
    timed = {False: [], True: []}
    params = 0
    for r in range(args.rounds):
        for overlap in (False, True):
            t, params = block(args, overlap, root / f"r{r}-{'on' if overlap else 'off'}")
            timed[overlap] += t
    if dist.get_rank() == 0:
        off, on = statistics.median(timed[False]), statistics.median(timed[True])
        print(f"preset {args.preset}, seq {args.seq}, micro-batch {args.mbs} x {args.micro} per "
              f"rank, DP 2 (gloo, 2 ranks x 1 thread), distributed optimizer; {params / 1e6:.1f}M "
              f"parameters: {params * 4 / 2**20:.0f} MiB of fp32 gradients reduce-scattered "
              f"and {params * 4 / 2**20:.0f} MiB of parameters gathered per step")
        print("| overlap | median step s | steps timed | all steps s |")
        print("|---|---|---|---|")
        for name, ov in (("off", False), ("on", True)):
            print(f"| {name} | {statistics.median(timed[ov]):.3f} | {len(timed[ov])} | "
                  f"{' '.join(f'{x:.2f}' for x in timed[ov])} |")
        print(f"ratio on / off: {on / off:.3f}")
    parallel.shutdown()


def main():
    args = parse()
    if "RANK" in os.environ:
        ranks(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node=2", __file__, *sys.argv[1:]], env=env))


if __name__ == "__main__":
    main()
