"""Activation memory with and without recomputation: one training forward + backward of one stage.

Two figures per setting, each from a fresh process (so peaks do not carry over):
- saved MiB: bytes of the distinct activation tensors (weights excluded) autograd keeps for
  backward at the end of the forward (counted with torch.autograd.graph.saved_tensors_hooks;
  exact, noise-free: this is what recomputation trades for compute);
- peak RSS MiB: the process's resident-set peak over the whole forward + backward, minus its
  resident size just before the forward (includes the recompute's transient activations).

    python benchmarks/recompute_memory.py [--presets tiny,135m] [--seq 512] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

SETTINGS = {
    "none": ["model.recompute=none"],
    "selective": ["model.recompute=selective"],
    "full (layer)": ["model.recompute=full", "model.recompute_unit=layer"],
    "full (step)": ["model.recompute=full", "model.recompute_unit=step"],
}


def measure(preset: str, seq: int, batch: int, overrides: list[str]) -> dict:
    import resource

    import torch

    from megamor import parallel
    from megamor.config import load_config
    from megamor.model import build_stage, padded_vocab_size, transformer_config
    from megamor.shims import install_cpu_shims, seed_model_parallel_rng

    install_cpu_shims()
    parallel.initialize(1, 1, torch.device("cpu"))
    seed_model_parallel_rng(0, 0)
    cfg = load_config(None, [f"model.preset={preset}", f"model.seq_length={seq}",
                             "model.arch=mor", *overrides]).validate(1)
    vocab = padded_vocab_size(8192, 64, 1)
    model = build_stage(cfg, transformer_config(cfg, torch.float32), vocab, 0, seed=0)
    model.train()
    ids = torch.randint(0, 8192, (batch, seq))
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # activations only: weights saved for backward are not what recompute saves
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).mean()
    saved = sum(seen.values())
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"saved_mib": saved / 2**20, "peak_rss_mib": (peak - before) / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,135m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: preset|setting
    args = ap.parse_args()
    if args.one:
        warnings.filterwarnings("ignore")
        preset, setting = args.one.split("|")
        print(json.dumps(measure(preset, args.seq, args.batch, SETTINGS[setting])))
        return
    print(f"MoR expert-choice, seq {args.seq}, batch {args.batch}, fp32, one stage, CPU")
    print(f"{'preset':<8}{'recompute':<14}{'saved MiB':>11}{'x none':>8}{'peak RSS MiB':>14}{'x none':>8}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for preset in args.presets.split(","):
        base = None
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--batch",
                                  str(args.batch), "--one", f"{preset}|{setting}"],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{preset} {setting} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r
            print(f"{preset:<8}{setting:<14}{r['saved_mib']:>11.1f}"
                  f"{r['saved_mib'] / base['saved_mib']:>8.2f}{r['peak_rss_mib']:>14.1f}"
                  f"{r['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
