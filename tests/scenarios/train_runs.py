"""Multi-rank scenario: several complete training runs, one after the other, in one launch of the
ranks (start-up is most of a short run's cost on CPU).

    train_runs.py --root DIR --out FILE --runs '{"name": ["section.option=value", ...], ...}'
                  [overrides common to every run ...]

Run `name` writes into DIR/name (its run.output_dir). Rank 0 prints `=== run NAME` before each
run's own output and writes {name: history} (the trainer's per-step metrics) to FILE.
"""

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch.distributed as dist

from megamor import parallel
from megamor.config import load_config
from megamor.training.loop import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", required=True, help="JSON: run name -> list of overrides")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    results = {}
    for name, overrides in json.loads(args.runs).items():
        cfg = load_config(None, [*args.overrides, f"run.output_dir={Path(args.root) / name}",
                                 *overrides])
        trainer = Trainer(cfg)
        if trainer.dims.rank == 0:
            print(f"=== run {name}", flush=True)
        results[name] = trainer.train()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    parallel.shutdown()


if __name__ == "__main__":
    main()
