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


def measure(overrides: list[str], seq: int, batch: int, vocab: int = 8192) -> dict:
    """One forward + backward of one stage built from `overrides` (in this process: call it in a
    fresh one, `measure_fresh`, or the peak RSS carries earlier work)."""

    import torch

    from megamor.config import load_config
    from megamor.inference import build_single_process_model

    cfg = load_config(None, [f"model.seq_length={seq}", *overrides]).validate(1)
    model, _ = build_single_process_model(cfg, vocab, seed=0)
    model.train()
    ids = torch.randint(0, vocab, (batch, seq))
    got = forward_backward_memory(model, ids)
    return {k: got[k] for k in ("saved_mib", "peak_rss_mib")}


def forward_backward_memory(model, ids) -> dict:
    """One forward + backward of `model` on `ids` (labels = ids) in this process: `saved_mib`,
    the distinct activation tensors (weights excluded: not what recompute saves) autograd keeps
    for backward at the end of the forward (saved_tensors_hooks; exact), and `peak_rss_mib`, the
    resident-set peak over forward + backward minus the resident size just before (VmHWM after
    clear_refs 5; not ru_maxrss, which across fork + exec keeps a big parent's size). Also
    benchmarks/sp_memory.py's per-rank figure."""
    import torch

    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).mean()
    saved = sum(seen.values())
    loss.backward()
    peak = _status_bytes("VmHWM")
    return {"saved_mib": saved / 2**20, "peak_rss_mib": (peak - before) / 2**20,
            "loss": float(loss)}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_fresh(overrides: list[str], seq: int, batch: int, vocab: int = 8192) -> dict:
    """`measure` in a fresh process (so peaks do not carry over), OMP_NUM_THREADS 2 unless set."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    job = json.dumps({"overrides": overrides, "seq": seq, "batch": batch, "vocab": vocab})
    out = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        sys.exit(f"recompute_memory: {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,135m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # measure_fresh's JSON job
    args = ap.parse_args()
    if args.child:
        warnings.filterwarnings("ignore")
        print(json.dumps(measure(**json.loads(args.child))))
        return
    print(f"MoR expert-choice, seq {args.seq}, batch {args.batch}, fp32, one stage, CPU")
    print(f"{'preset':<8}{'recompute':<14}{'saved MiB':>11}{'x none':>8}{'peak RSS MiB':>14}{'x none':>8}")
    for preset in args.presets.split(","):
        base = None
        for setting, overrides in SETTINGS.items():
            r = measure_fresh([f"model.preset={preset}", "model.arch=mor", *overrides], args.seq,
                              args.batch)
            base = base or r
            print(f"{preset:<8}{setting:<14}{r['saved_mib']:>11.1f}"
                  f"{r['saved_mib'] / base['saved_mib']:>8.2f}{r['peak_rss_mib']:>14.1f}"
                  f"{r['peak_rss_mib'] / base['peak_rss_mib']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
