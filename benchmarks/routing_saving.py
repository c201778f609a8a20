"""Is MoR's compute saving real? Forward+backward time of one stage, vanilla vs recursive vs MoR.

Same unrolled depth and shape for all; runs are interleaved round-robin in one process so machine
noise hits them alike; prints the median time and the ratio to vanilla, next to the ratio of
tokens processed (what gathering should save).

    python benchmarks/routing_saving.py [--seq 512] [--batch 4] [--iters 10]
"""

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch

from megamor import parallel
from megamor.config import load_config
from megamor.inference import build_single_process_model

from step_speed import KINDS as STEP_KINDS

KINDS = {**STEP_KINDS, "mor_expert_kvshare": ["model.arch=mor", "model.kv_sharing=true"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--preset", default="tiny-wide")
    args = ap.parse_args()
    vocab = 1024
    models = {}
    for kind, ov in KINDS.items():
        cfg = load_config(None, [f"model.preset={args.preset}", f"model.seq_length={args.seq}", *ov]).validate(1)
        models[kind] = build_single_process_model(cfg, vocab, seed=0)[0]
        models[kind].train()
    tokens = torch.randint(0, vocab, (args.batch, args.seq))
    times = {k: [] for k in models}
    tok = {}
    for it in range(args.iters + 2):
        for kind, m in models.items():
            m.reset_stats()
            t0 = time.perf_counter()
            m(input_ids=tokens, labels=tokens).mean().backward()
            dt = time.perf_counter() - t0
            if it >= 2:  # warm-up
                times[kind].append(dt)
            tok[kind] = sum(m.token_counts.values())
    base_t, base_tok = statistics.median(times["vanilla"]), tok["vanilla"]
    print(f"preset={args.preset} seq={args.seq} batch={args.batch} iters={args.iters} threads={torch.get_num_threads()}")
    print(f"{'model':<20}{'median s':>10}{'time/vanilla':>14}{'tokens/vanilla':>16}")
    for kind in models:
        t = statistics.median(times[kind])
        print(f"{kind:<20}{t:>10.4f}{t / base_t:>14.3f}{tok[kind] / base_tok:>16.3f}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
