"""Peak memory per rank of the training engines, measured against `megamor plan`'s prediction.

    python -m torch.distributed.run --standalone --nproc-per-node=2 benchmarks/engine_memory.py \
        [--engines megatron,zero1,zero2,zero3] [section.option=value ...]

Each engine trains a few steps in a fresh process pair (this script re-launches itself per
engine, so that one engine's peak does not hide another's). A shape whose weights and optimizer
state outweigh its activations (hidden 768, short sequences), fp32 on the CPU, data parallel 2.
Per rank: the resident memory the run adds over the process before the trainer is built
(/proc VmHWM after clear_refs), next to the planner's weights + grads + optimizer + activations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SHAPE = ["model.preset=tiny", "model.hidden_size=768", "model.num_attention_heads=12",
         "model.num_query_groups=4", "model.ffn_hidden_size=2048", "model.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=4", "tracking.enabled=false",
         "train.warmup_steps=0", "train.lr_schedule=constant", "train.train_steps=4",
         "tracking.depth_map_interval=0"]
ENGINES = {"megatron": [], "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
           "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
           "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"]}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(engine: str, overrides: list[str], out: Path) -> None:
    """One rank's run (under torchrun)."""
    import torch.distributed as dist
    from megamor import parallel
    from megamor.config import load_config
    from megamor.training.data import open_dataset
    from megamor.training.loop import Trainer

    cfg = load_config(None, [*SHAPE, *ENGINES[engine], *overrides,
                             f"run.output_dir={out.parent / engine}"])
    open_dataset(cfg)
    if cfg.parallel.engine == "deepspeed":
        import deepspeed  # noqa: F401  (its import is not the run's memory; megatron's is loaded too)
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    trainer = Trainer(cfg)
    built = (_kib("VmHWM") - base) * 1024
    for _ in range(3):
        trainer.train_step()
    added = (_kib("VmHWM") - base) * 1024
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (built, added))
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"built_bytes": [g[0] for g in got],
                                   "added_bytes": [g[1] for g in got],
                                   "vocab_size": trainer.vocab_size}))
    parallel.shutdown()


def predicted(engine: str, overrides: list[str], vocab: int) -> dict:
    from megamor.config import load_config
    from megamor.planner import Cluster, Layout, predict
    cfg = load_config(None, [*SHAPE, *overrides])
    p = predict(cfg, Layout(1, 1, 2, 2, "none", "megatron" if engine == "megatron" else engine),
                cfg.model.seq_length, 4, Cluster(), vocab, "fp32")
    return p.memory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one engine, under torchrun
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure, args.overrides, Path(args.out))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            out = Path(tmp) / f"{engine}.json"
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", __file__, "--measure", engine, "--out", str(out),
                            *args.overrides], check=True, env=env, capture_output=True)
            got = json.loads(out.read_text())
            pred = predicted(engine, args.overrides, got["vocab_size"])
            rows.append((engine, max(got["built_bytes"]) / 2**20, max(got["added_bytes"]) / 2**20,
                         pred))
    print(f"{'engine':>9} | measured MiB/rank: {'built':>6} {'peak':>6} | predicted MiB: "
          f"{'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7} | measured/predicted")
    for engine, built, mib, p in rows:
        print(f"{engine:>9} | {'':>18} {built:6.1f} {mib:6.1f} | {'':>15}{1024 * p['weights']:8.1f} "
              f"{1024 * p['grads']:7.1f} {1024 * p['optimizer']:7.1f} "
              f"{1024 * p['activations']:7.1f} {1024 * p['total']:7.1f} | {mib / (1024 * p['total']):.2f}")


if __name__ == "__main__":
    main()
