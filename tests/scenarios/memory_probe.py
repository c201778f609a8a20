"""One process: the peak resident memory a short training run adds, for the planner's check.

    python memory_probe.py --out FILE [--steps 2] [section.option=value ...]

Builds the dataset first (tokenizer training is not part of a step), then resets the kernel's
peak-RSS counter (/proc/self/clear_refs, 5), reads the current RSS as the baseline (Python,
torch, megatron-core, the data), builds the trainer and runs a few steps. Writes the baseline,
peak and their difference in bytes, and the padded vocabulary the model used.
"""

import argparse
import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from megamor import parallel
from megamor.config import load_config
from megamor.training.data import open_dataset
from megamor.training.loop import Trainer


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, ["tracking.enabled=false", "train.warmup_steps=0",
                             "train.lr_schedule=constant", *args.overrides,
                             f"train.train_steps={args.steps + 1}"])
    open_dataset(cfg)  # build the embedded corpus's tokenizer and shards outside the measurement
    Path("/proc/self/clear_refs").write_text("5")
    base = status_kib("VmRSS")
    trainer = Trainer(cfg)
    for _ in range(args.steps):
        trainer.train_step()
    peak = status_kib("VmHWM")
    Path(args.out).write_text(json.dumps({
        "baseline_bytes": base * 1024, "peak_bytes": peak * 1024,
        "added_bytes": (peak - base) * 1024, "vocab_size": trainer.vocab_size}))
    parallel.shutdown()


if __name__ == "__main__":
    main()
