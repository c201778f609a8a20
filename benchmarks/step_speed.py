"""Training-step speed on this machine: vanilla, recursive and MoR side by side, against the
measured matmul peak.

One process, fp32, one stage. A step is what the trainer does per optimizer step: forward, loss,
backward, gradient clipping, AdamW. Models are stepped round-robin in one run so machine noise
hits them alike; the median of the timed steps is reported with
- time / vanilla next to FLOPs / vanilla (the FLOPs model of megamor/flops.py, charging each
  recursion step for the tokens it processed): if time follows FLOPs, skipped work became time;
- executed model FLOP/s as a fraction of a square fp32 matmul's FLOP/s measured in the same run.

    python benchmarks/step_speed.py                        # the issue-13 shape, N_r = 3
    python benchmarks/step_speed.py --nr 2,3,4 --seqs 512,1024,2048 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch

from megamor import parallel
from megamor.config import load_config
from megamor.flops import flops_per_step, measure_cpu_peak_flops
from megamor.inference import build_single_process_model
from megamor.model import padded_vocab_size

KINDS = {
    "vanilla": ["model.arch=vanilla"],
    "recursive": ["model.arch=recursive"],
    "mor_expert": ["model.arch=mor"],
    "mor_token": ["model.arch=mor", "routing.type=token_choice"],
}


def shape(args, nr: int, seq: int) -> list[str]:
    # middle-cycle: 1 + B x N_r + 1 with B = 2 shared layers -> 8 unrolled layers at N_r = 3
    layers = 2 + 2 * nr
    return [f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
            f"model.num_query_groups={args.groups}", f"model.ffn_hidden_size={args.ffn}",
            f"model.num_layers={layers}", f"model.num_recursions={nr}", f"model.seq_length={seq}",
            f"model.vocab_size={args.vocab}", "model.make_vocab_size_divisible_by=64"]


def build(over: list[str], vocab: int):
    cfg = load_config(None, over).validate(1)
    model, _ = build_single_process_model(cfg, vocab, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False)
    return cfg, model, opt


def step(model, opt, ids) -> None:
    opt.zero_grad(set_to_none=True)
    model.reset_stats()
    model(input_ids=ids, labels=ids).float().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def step_flops(cfg, model, seq: int, batch: int, vocab: int) -> float:
    """Model FLOPs of the step `model` just took (FLOPs model, at the tokens each layer processed)."""
    tokens = [model.token_counts.get(i, 0.0) for i in range(len(model.plan.layers))]
    return flops_per_step(cfg.model, model.plan, tokens, seq, batch,
                          padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, 1),
                          cfg.routing)["total"]


def round_robin(steps_by_name: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """Call every step function once per round, `warmup + steps` rounds, in the same order each
    round (so machine noise hits all alike); wall seconds of the timed rounds per name."""
    times = {k: [] for k in steps_by_name}
    for it in range(warmup + steps):
        for name, fn in steps_by_name.items():
            t0 = time.perf_counter()
            fn()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def run(args, nr: int, seq: int, peak: float) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, seq))
    runs = {k: build(shape(args, nr, seq) + ov, args.vocab) for k, ov in KINDS.items()}
    times = round_robin({k: (lambda m=m, o=o: step(m, o, ids)) for k, (_, m, o) in runs.items()},
                        args.warmup, args.steps)
    flops = {k: step_flops(cfg, m, seq, args.batch, args.vocab) for k, (cfg, m, _) in runs.items()}
    base_t, base_f = statistics.median(times["vanilla"]), flops["vanilla"]
    print(f"\nN_r={nr} seq={seq} batch={args.batch} hidden={args.hidden} layers={2 + 2 * nr} "
          f"vocab={args.vocab} threads={torch.get_num_threads()} steps={args.steps}")
    print(f"{'kind':<12}{'ms/step':>9}{'time/van':>10}{'FLOPs/van':>11}{'GFLOP':>8}{'of peak':>9}")
    for kind in runs:
        t = statistics.median(times[kind])
        print(f"{kind:<12}{1000 * t:>9.0f}{t / base_t:>10.3f}{flops[kind] / base_f:>11.3f}"
              f"{flops[kind] / 1e9:>8.1f}{flops[kind] / t / peak:>9.2f}", flush=True)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model shape options `shape` reads (issue 13's shape by default)."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqs", default="512")
    ap.add_argument("--nr", default="3")
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    peak = measure_cpu_peak_flops(size=2048)
    print(f"fp32 matmul peak (2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.0f} GFLOP/s")
    for nr in [int(x) for x in args.nr.split(",")]:
        for seq in [int(x) for x in args.seqs.split(",")]:
            run(args, nr, seq, peak)
    parallel.shutdown()


if __name__ == "__main__":
    main()
