"""Multi-rank scenario: the trainer's step, checkpoint (save + resume), depth-map and signal paths
under megamor's collective guard, which records every torch.distributed call and flags each
tensor an NCCL group could not take (see megamor/testing/collective_guard.py for the rule).

    nccl_path.py --out FILE [--resume-with OVERRIDE ...] [overrides ...]   (under torchrun)

Run 1 gets SIGUSR1 on rank 0 after step 3 (every rank saves, exit 75), then draws a depth
map; run 2 resumes from that checkpoint and finishes (and saves). Before run 1 the guard proves,
on the live process groups, that it flags a host tensor and passes a device tensor. Rank r
writes FILE.r (JSON).
"""

import argparse
import json
import os
import signal
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from megamor.testing import collective_guard  # noqa: E402  (before megatron: it captures collectives)
from megamor.shims import install_cpu_shims  # noqa: E402

install_cpu_shims()
GUARD = collective_guard.install()

import torch.distributed as dist  # noqa: E402

from megamor import parallel  # noqa: E402
from megamor.config import load_config  # noqa: E402
from megamor.training.depth_maps import routing_depths  # noqa: E402
from megamor.training.loop import Preempted, Trainer  # noqa: E402


def signal_after(trainer, step: int) -> None:
    """SIGUSR1 to this process once `step` is trained (what Slurm sends before the time limit)."""
    train_step = trainer.train_step

    def wrapped():
        m = train_step()
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return m

    trainer.train_step = wrapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume-with", action="append", default=[], help="override for run 2 only")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = [*args.overrides, "checkpoint.save_on_signal=true", "tracking.enabled=false",
              "tracking.depth_map_interval=0"]
    out: dict = {}

    first = Trainer(load_config(None, common))
    out["probe"] = GUARD.probe(first.dims.pp_group, first.dims.device)
    if first.dims.rank == 0:
        signal_after(first, 3)
    try:
        first.train()
        out["exit"] = None
    except Preempted as e:
        out["exit"] = e.code
    out["depths"] = routing_depths(first.engine, first.depth_maps.ids[:16])
    second = Trainer(load_config(None, common + ["checkpoint.resume=auto", *args.resume_with]))
    out["resumed_at"] = second.step
    out["losses"] = [m["loss"] for m in first.history + second.train()]
    out.update(GUARD.report())
    Path(f"{args.out}.{dist.get_rank()}").write_text(json.dumps(out))
    parallel.shutdown()


if __name__ == "__main__":
    main()
