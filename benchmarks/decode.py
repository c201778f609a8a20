"""Decode throughput and KV-cache memory: MoR (N_r = 2, 3, 4) vs vanilla of the same unrolled depth.

All models run through the exported modeling code (megamor/hf/modeling_mor.py) with the same
shape and unrolled depth (1 + 12 + 1 layers, middle-cycle sharing for MoR), so the ratios measure
recursion-wise caching and per-step gathering, not two implementations. HF's own
LlamaForCausalLM with the vanilla weights is timed as a reference row.

Weights are random (throughput does not depend on what the weights say), except that each
expert-choice router is calibrated to the paper's capacity schedule: its weight gets a component
along the mean hidden state entering its step, scaled by bisection until threshold routing
(sigmoid(logit) >= 0.5, what generation uses) keeps c_r = (N_r - r + 1) / N_r of the tokens on
calibration text. The fraction of tokens that actually reached each step while decoding is
printed next to the timings.

Timing: cached decoding of --new tokens (teacher-forced, see `decode`) after a --prompt-token prefill (prefill not timed), at
each batch size; the kinds are interleaved round-robin for --reps repetitions and the median is
reported, so machine noise hits all alike; speeds are given against megamor's vanilla path and
against transformers' Llama (the model a user would compare with). KV memory: bytes of the K/V
entries stored after the run (recursion-wise caching stores only the tokens each step
processed) and of the buffers allocated to hold them (they grow geometrically).

    python benchmarks/decode.py [--batches 1,32] [--new 64] [--prompt 64] [--reps 3] [--kinds ...]
                                [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch

from megamor.hf.configuration_mor import MoRConfig
from megamor.hf.modeling_mor import MoRForCausalLM

SHAPE = dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096)
DEPTH = 14  # 1 + 12 + 1: divisible into N_r = 2, 3, 4 recursions of the middle block


def plan(num_recursions: int | None):
    if num_recursions is None:
        return dict(arch="vanilla", layer_unique=list(range(DEPTH)), layer_step=[0] * DEPTH,
                    layer_slot=[0] * DEPTH, num_recursions=1, capacities=[1.0])
    B = (DEPTH - 2) // num_recursions
    unique, step, slot = [0], [0], [0]
    for m in range(DEPTH - 2):
        unique.append(1 + m % B)
        step.append(m // B + 1)
        slot.append(m % B)
    unique.append(B + 1)
    step.append(0)
    slot.append(0)
    return dict(arch="mor", layer_unique=unique, layer_step=step, layer_slot=slot,
                num_recursions=num_recursions, router_type="expert_choice", router_alpha=0.1)


def build(num_recursions: int | None, kv_sharing: bool = False) -> MoRForCausalLM:
    torch.manual_seed(0)
    conf = MoRConfig(**SHAPE, num_hidden_layers=DEPTH, kv_sharing=kv_sharing, **plan(num_recursions))
    return MoRForCausalLM(conf).eval()


@torch.no_grad()
def calibrate(model: MoRForCausalLM, ids: torch.Tensor) -> list[float]:
    """Set each router so that threshold routing keeps the capacity schedule (see docstring)."""
    conf = model.config
    if conf.arch != "mor":
        return []
    for r in range(2, conf.num_recursions + 1):
        router = model.model.routers[str(r)]
        base = router.weight.clone()
        # Mean hidden state entering step r: run with the steps so far, capture via a hook.
        # (the step's first unique layer runs once per step that has tokens: its r-th call).
        calls = []
        first = conf.layer_step.index(r)
        layer = model.model.layers[conf.layer_unique[first]]
        h = layer.register_forward_pre_hook(lambda mod, args: calls.append(args[0]))
        model(ids)
        h.remove()
        x = calls[min(r, len(calls)) - 1]
        direction = x.reshape(-1, x.shape[-1]).mean(0)
        direction = direction / direction.norm()
        target = conf.capacities[r - 1] / conf.capacities[r - 2]  # of the tokens reaching r-1... r
        lo, hi = -10.0, 10.0
        for _ in range(20):
            lam = (lo + hi) / 2
            router.weight.copy_(base + lam * direction)
            trace = {}
            model(ids, routing_trace=trace)
            frac = (trace[r].sum() / trace[r - 1].sum()).item()
            lo, hi = (lo, lam) if frac > target else (lam, hi)
    trace = {}
    model(ids, routing_trace=trace)
    return [round(trace[r].float().mean().item(), 3) for r in sorted(trace)]


@torch.no_grad()
def decode(model, prompt: torch.Tensor, continuation: torch.Tensor):
    """Cached decoding, one token per step for every sequence; returns (seconds for the decode
    steps, cache, mean fraction of the batch reaching each step).

    The token fed at each step is the next one of a fixed continuation (the same for every
    model), not the model's own argmax: a random model's greedy output degenerates into
    repeating one token, which would make the routing pattern unrepresentative. The work per
    step is the same as in greedy decoding (logits of the last position included)."""
    cache = prefill(model, prompt)
    t0 = time.perf_counter()
    cache, traces = steps(model, cache, continuation)
    seconds = time.perf_counter() - t0  # the routing statistics below are not timed
    new = continuation.shape[1]
    counts = {r: sum(t[r].float().mean().item() for t in traces) / new for r in traces[0]}
    return seconds, cache, counts


def prefill(model, prompt: torch.Tensor):
    out = model(prompt, use_cache=True)
    return out.cache if hasattr(out, "cache") else out.past_key_values


def steps(model, cache, continuation: torch.Tensor):
    """The decode steps after the prefill: (cache, routing trace of each step)."""
    traces = []
    for i in range(continuation.shape[1]):
        nxt = continuation[:, i:i + 1]
        trace = {} if isinstance(model, MoRForCausalLM) else None
        kw = {"routing_trace": trace} if trace is not None else {}
        out = model(nxt, cache=cache, use_cache=True, **kw)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        out.logits[:, -1].argmax(-1)
        traces.append(trace or {})
    return cache, traces


def kv_bytes(cache, allocated: bool = False) -> int:
    """Bytes of the stored K/V entries (allocated: of the buffers holding them)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes(allocated)
    total = 0  # transformers DynamicCache
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", default="vanilla,mor2,mor3,mor4,mor3_kvshare,hf_llama",
                    help="models to time (vanilla is always included: the ratios' base)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings: torch.profiler of one decode of each model at the "
                         "last batch size (top ops by self CPU time)")
    args = ap.parse_args()
    kinds = set(args.kinds.split(",")) | {"vanilla"}
    unknown = kinds - {"vanilla", "mor2", "mor3", "mor4", "mor3_kvshare", "hf_llama"}
    if unknown:
        ap.error(f"--kinds: unknown model(s) {sorted(unknown)}")
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, SHAPE["vocab_size"], (4, 128), generator=g)
    models = {"vanilla": build(None)}
    fractions = {}
    for n in (2, 3, 4):
        if f"mor{n}" in kinds:
            models[f"mor{n}"] = build(n)
            fractions[f"mor{n}"] = calibrate(models[f"mor{n}"], calib)
    if "mor3_kvshare" in kinds:
        models["mor3_kvshare"] = build(3, kv_sharing=True)
        fractions["mor3_kvshare"] = calibrate(models["mor3_kvshare"], calib)
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=DEPTH, head_dim=64,
                                         tie_word_embeddings=True, attention_bias=False,
                                         mlp_bias=False)).eval()
    missing = llama.load_state_dict(models["vanilla"].state_dict(), strict=False)
    assert not missing.unexpected_keys, missing
    if "hf_llama" in kinds:
        models["hf_llama"] = llama
    print("calibrated fraction of calibration tokens per step:", fractions)

    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, SHAPE["vocab_size"], (batch, args.prompt), generator=g)
        continuation = torch.randint(0, SHAPE["vocab_size"], (batch, args.new), generator=g)
        times = {k: [] for k in models}
        info = {}
        for _ in range(args.reps):
            for kind, model in models.items():
                dt, cache, counts = decode(model, prompt, continuation)
                times[kind].append(dt)
                info[kind] = (kv_bytes(cache), kv_bytes(cache, allocated=True), counts)
        base_t = statistics.median(times["vanilla"])
        llama_t = statistics.median(times["hf_llama"]) if "hf_llama" in times else float("nan")
        base_kv = info["vanilla"][0]
        print(f"\nbatch {batch}: {args.new} new tokens after a {args.prompt}-token prompt, "
              f"median of {args.reps}")
        print(f"{'model':14s} {'decode tok/s':>13s} {'vs vanilla':>11s} {'vs hf_llama':>12s} "
              f"{'KV MiB':>8s} {'KV vs vanilla':>14s} {'allocated MiB':>14s}  tokens reaching each step")
        for kind in models:
            t = statistics.median(times[kind])
            kv, alloc, counts = info[kind]
            row = dict(model=kind, batch=batch, tokens_per_s=batch * args.new / t,
                       speedup=base_t / t, speedup_vs_hf_llama=llama_t / t, kv_bytes=kv,
                       kv_ratio=kv / base_kv, kv_allocated_bytes=alloc,
                       step_fractions=[round(counts[r], 3) for r in sorted(counts)])
            results.append(row)
            print(f"{kind:14s} {row['tokens_per_s']:13.0f} {row['speedup']:10.2f}x "
                  f"{row['speedup_vs_hf_llama']:11.2f}x {kv / 2**20:8.2f} {row['kv_ratio']:13.2f}x "
                  f"{alloc / 2**20:14.2f}  {row['step_fractions']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.profile:
        for kind, model in models.items():
            profile(kind, model, prompt, continuation)


def profile(kind: str, model, prompt: torch.Tensor, continuation: torch.Tensor, top: int = 10):
    """Where one decode's time goes: the top ops by self CPU time, with their share."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cache = prefill(model, prompt)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(model, cache, continuation)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile {kind} (batch {prompt.shape[0]}, {continuation.shape[1]} decode steps): "
          f"{total / 1e3:.0f} ms self CPU")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key:42s} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%"
              f"  {e.count:6d} calls")


if __name__ == "__main__":
    main()
