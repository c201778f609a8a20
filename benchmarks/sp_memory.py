"""Activation memory per tensor-parallel rank with and without sequence parallelism, TP 2.

One training forward + backward of one micro-batch through the whole model (one pipeline stage)
on two gloo ranks, each setting in a fresh launch of the ranks (so peaks do not carry over), for
each model kind, with sequence parallelism off and on side by side. Per rank:
- saved MiB: bytes of the distinct activation tensors (weights excluded) autograd keeps for
  backward at the end of the forward (torch.autograd.graph.saved_tensors_hooks; exact and
  noise-free);
- peak RSS MiB: the rank's resident-set peak over forward + backward minus its resident size
  just before the forward (includes transients and allocator slack).
The ratio columns divide the SP run's figure by the same kind's run without SP (the larger of
the two ranks' figures each).

    python benchmarks/sp_memory.py [--preset 135m] [--seq 2048] [--batch 1]
                                   [--kinds vanilla,mor_ec,mor_tc] [overrides ...]

The 135m preset's 9 heads / 3 query groups do not split over two ranks: the default shape keeps
its width, depth and FFN with 8 heads of 72 and 4 query groups (`model.num_attention_heads=8
model.num_query_groups=4`, overridable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

from recompute_memory import forward_backward_memory  # benchmarks/: the same measurement

KINDS = {
    "vanilla": ["model.arch=vanilla", "model.num_layers=30"],
    "mor_ec": ["model.arch=mor", "routing.type=expert_choice"],
    "mor_tc": ["model.arch=mor", "routing.type=token_choice"],
}
SHAPE = ["model.num_attention_heads=8", "model.num_query_groups=4"]


def rank_main(job: dict) -> None:
    """One rank of a launch: build the stage at TP 2, one forward + backward, report."""
    import torch
    import torch.distributed as dist

    from megamor import parallel
    from megamor.config import load_config
    from megamor.model import build_stage, padded_vocab_size, transformer_config
    from megamor.shims import install_cpu_shims, seed_model_parallel_rng

    install_cpu_shims()
    cfg = load_config(None, [f"model.seq_length={job['seq']}", *job["overrides"],
                             "parallel.tensor_model_parallel_size=2",
                             f"parallel.sequence_parallel={str(job['sp']).lower()}"]).validate(2)
    dims = parallel.initialize(2, 1, torch.device("cpu"))
    seed_model_parallel_rng(0, dims.tp_rank)
    vocab = padded_vocab_size(job["vocab"], cfg.model.make_vocab_size_divisible_by, 2)
    model = build_stage(cfg, transformer_config(cfg, torch.float32), vocab, 0, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, job["vocab"], (job["batch"], job["seq"]), generator=g)
    rows = []  # tokens per rank entering the first layer: s (no SP) or s / tp
    first = next(iter(model.layers.values()))
    first.register_forward_pre_hook(
        lambda mod, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    dist.barrier()
    mine = {**forward_backward_memory(model, ids), "rows": rows[0]}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(every, f)
    parallel.shutdown()


def launch(overrides: list[str], sp: bool, seq: int, batch: int, vocab: int) -> list[dict]:
    """One fresh launch of two ranks (torchrun), OMP_NUM_THREADS 1 per rank unless set."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        job = json.dumps({"overrides": overrides, "sp": sp, "seq": seq, "batch": batch,
                          "vocab": vocab, "out": out})
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               __file__, "--rank-job", job]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"sp_memory: {' '.join(overrides)} sp={sp} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="135m")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rank-job", help=argparse.SUPPRESS)  # one rank of `launch`
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.rank_job:
        warnings.filterwarnings("ignore")
        rank_main(json.loads(args.rank_job))
        return
    print(f"{args.preset} ({' '.join(SHAPE + args.overrides)}), seq {args.seq}, batch {args.batch}, "
          f"vocab {args.vocab}, fp32, TP 2, one stage, CPU; per rank (max of the two ranks)")
    print(f"{'kind':<9}{'sp':<5}{'rows/rank':>10}{'saved MiB':>11}{'x no SP':>9}"
          f"{'peak RSS MiB':>14}{'x no SP':>9}{'loss':>10}")
    for kind in args.kinds.split(","):
        overrides = [f"model.preset={args.preset}", *KINDS[kind], *SHAPE, *args.overrides]
        base = None
        for sp in (False, True):
            ranks = launch(overrides, sp, args.seq, args.batch, args.vocab)
            r = {k: max(x[k] for x in ranks) for k in ("saved_mib", "peak_rss_mib")}
            base = base or r
            print(f"{kind:<9}{'on' if sp else 'off':<5}{ranks[0]['rows']:>10}"
                  f"{r['saved_mib']:>11.1f}{r['saved_mib'] / base['saved_mib']:>9.2f}"
                  f"{r['peak_rss_mib']:>14.1f}{r['peak_rss_mib'] / base['peak_rss_mib']:>9.2f}"
                  f"{ranks[0]['loss']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
