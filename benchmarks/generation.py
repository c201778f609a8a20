"""Serving throughput of the generation engine (megamor/generation): MoR N_r = 2, 3, 4 against
vanilla and recursive models of the same unrolled depth in the same engine, against the same
engine's synchronous schedule, and against transformers' `generate()` of the exported models.

Models: those of benchmarks/decode.py (hidden 512, 8 heads, 4 KV heads, FFN 1408, vocabulary
1024, 14 unrolled layers; MoR: 1 + 12 + 1 middle-cycle, expert-choice, routers calibrated so that
threshold routing keeps the paper's capacities). Random weights, so tokens are *sampled*
(temperature 1, a seed per request): a random model's greedy output repeats one token, which
would make routing unrepresentative; sampling costs the same as greedy.

Stream: --requests requests with prompt lengths uniform in --prompt-range and output lengths
uniform in --output-range (no stop token), all queued at the start, served in order. A run
generates the whole stream; tokens/s = generated tokens / wall time (prefill included). Batch
limits: --batches (sequences in flight), and `budget`: no batch limit (--budget-batch slots)
but a KV-cache budget of --kv-budget-mb, so each model holds as many sequences as its cache fits
(MoR's smaller caches fit more).
transformers rows: the stream cut into static batches of the limit, left-padded, each batch
generating up to its longest request (what `model.generate` does for a batch); only each
request's own tokens count.

Speed: generated tokens per CPU second of the benchmark process (one intra-op thread by
default), the measure that stays put on a shared machine, with wall-clock tokens/s next to it.
Reported per row: that speed, ratios (vs vanilla in the same setting; depth-wise vs synchronous
and vs transformers for the same model), mean sequences in flight, layer passes per decoded
token, rows per shared-block call, KV-cache peak (entries stored, and pages in use).

    python benchmarks/generation.py [--batches 8,32,budget] [--kinds ...] [--requests 96]
        [--threads 1] [--profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch

from decode import DEPTH, SHAPE, build, calibrate, plan

from megamor.generation import Engine, Request
from megamor.hf.configuration_mor import MoRConfig
from megamor.hf.modeling_mor import MoRForCausalLM

KINDS = ("vanilla", "rec2", "rec3", "rec4", "mor2", "mor3", "mor4")


def build_kind(kind: str, calib: torch.Tensor):
    if kind == "vanilla":
        return build(None)
    n = int(kind[-1])
    if kind.startswith("rec"):
        torch.manual_seed(0)
        p = dict(plan(n), arch="recursive")
        return MoRForCausalLM(MoRConfig(**SHAPE, num_hidden_layers=DEPTH, **p)).eval()
    model = build(n)
    calibrate(model, calib)
    return model


def stream(n: int, prompts: tuple[int, int], outputs: tuple[int, int], seed: int = 0) -> list[Request]:
    g = random.Random(seed)
    return [Request(prompt_ids=[g.randrange(SHAPE["vocab_size"]) for _ in range(g.randint(*prompts))],
                    max_new_tokens=g.randint(*outputs), stop_token_ids=[], temperature=1.0, seed=i)
            for i in range(n)]


def run_engine(model, reqs, batch, schedule, budget_mb, budget_batch):
    if batch == "budget":
        engine = Engine(model, max_batch=budget_batch, schedule=schedule,
                        kv_cache_bytes=int(budget_mb * 2**20))
    else:
        engine = Engine(model, max_batch=int(batch), schedule=schedule)
    t0, c0 = time.perf_counter(), time.process_time()
    res = engine.generate(reqs)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = engine.stats.summary()
    return (dt, cpu), sum(len(r.tokens) for r in res), st


@torch.no_grad()
def run_transformers(model, reqs, batch: int):
    """Static batches of the stream through `generate()` (left padding, sampling)."""
    t0, c0 = time.perf_counter(), time.process_time()
    useful = 0
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        longest = max(len(r.prompt_ids) for r in chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[j, longest - len(r.prompt_ids):] = 1
        new = max(r.max_new_tokens for r in chunk)
        torch.manual_seed(i)
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                       top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        useful += sum(r.max_new_tokens for r in chunk)
    return (time.perf_counter() - t0, time.process_time() - c0), useful


def llama_of(vanilla):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, num_hidden_layers=DEPTH, head_dim=64,
                                         tie_word_embeddings=True, attention_bias=False,
                                         mlp_bias=False)).eval()
    llama.load_state_dict(vanilla.state_dict(), strict=False)
    return llama


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="vanilla,rec3,mor2,mor3,mor4",
                    help=f"engine models among {','.join(KINDS)} (vanilla always)")
    ap.add_argument("--sync", default="mor3",
                    help="models also run with the synchronous schedule")
    ap.add_argument("--hf", default="vanilla,mor3",
                    help="models also run through transformers' generate() (vanilla: LlamaForCausalLM)")
    ap.add_argument("--batches", default="8,32,budget")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-range", default="16,256")
    ap.add_argument("--output-range", default="16,96")
    ap.add_argument("--kv-budget-mb", type=float, default=192.0)
    ap.add_argument("--budget-batch", type=int, default=256, help="slots under the KV budget")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: steadiest on a shared machine)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--profile", action="store_true",
                    help="then torch.profiler of vanilla and MoR-3, depth-wise and synchronous, at "
                         "the last batch setting over the first 32 requests (top ops)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ["vanilla"] + [k for k in args.kinds.split(",") if k and k != "vanilla"]
    bad = set(kinds) - set(KINDS)
    if bad:
        ap.error(f"--kinds: unknown {sorted(bad)}")
    sync = [k for k in args.sync.split(",") if k in kinds]
    hf = [k for k in args.hf.split(",") if k in kinds]
    pr = tuple(int(v) for v in args.prompt_range.split(","))
    orng = tuple(int(v) for v in args.output_range.split(","))
    calib = torch.randint(0, SHAPE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(1))
    models = {k: build_kind(k, calib) for k in kinds}
    hf_models = {k: (llama_of(models[k]) if k == "vanilla" else models[k]) for k in hf}
    reqs = stream(args.requests, pr, orng)
    warm = stream(4, (8, 16), (4, 8), seed=1)
    for m in models.values():
        Engine(m, max_batch=4).generate(warm)
    print(f"stream: {len(reqs)} requests, prompts {pr[0]}-{pr[1]} tokens, outputs {orng[0]}-{orng[1]} "
          f"tokens ({sum(r.max_new_tokens for r in reqs)} to generate), threads {args.threads}")
    rows = []
    for batch in args.batches.split(","):
        runs = [(k, "depthwise") for k in kinds] + [(k, "synchronous") for k in sync]
        if batch != "budget":
            runs += [(k, "transformers") for k in hf]
        times: dict = {r: [] for r in runs}
        info: dict = {}
        for _ in range(args.reps):  # interleaved: machine noise hits every row alike
            for kind, mode in runs:
                if mode == "transformers":
                    dt, n = run_transformers(hf_models[kind], reqs, int(batch))
                    st = {}
                else:
                    dt, n, st = run_engine(models[kind], reqs, batch, mode, args.kv_budget_mb,
                                           args.budget_batch)
                times[(kind, mode)].append(dt)
                info[(kind, mode)] = (n, st)
        # tokens per CPU second of this single-threaded process: the work, whatever else the
        # shared machine runs (wall-clock tokens/s are given next to it)
        speed = {r: info[r][0] / statistics.median(c for _, c in times[r]) for r in runs}
        wall = {r: info[r][0] / statistics.median(w for w, _ in times[r]) for r in runs}
        limit = (f"KV budget {args.kv_budget_mb:g} MiB ({args.budget_batch} slots)"
                 if batch == "budget" else f"max batch {batch}")
        print(f"\n{limit}, median of {args.reps}:")
        print(f"{'model':9s} {'schedule':12s} {'tok/cpu-s':>9s} {'wall tok/s':>10s} {'vs vanilla':>10s} {'vs sync':>8s} "
              f"{'vs HF':>6s} {'in flight':>9s} {'passes/tok':>10s} {'block rows':>10s} "
              f"{'KV MiB':>7s} {'pages MiB':>9s} {'preempt':>7s}")
        for kind, mode in runs:
            n, st = info[(kind, mode)]
            s = speed[(kind, mode)]
            base = speed.get(("vanilla", mode)) or speed[("vanilla", "depthwise")]
            vs_sync = s / speed[(kind, "synchronous")] if (kind, "synchronous") in speed else None
            vs_hf = s / speed[(kind, "transformers")] if (kind, "transformers") in speed else None
            row = dict(batch=batch, model=kind, schedule=mode, tokens_per_cpu_s=s,
                       wall_tokens_per_s=wall[(kind, mode)], vs_vanilla=s / base,
                       vs_synchronous=vs_sync, vs_transformers=vs_hf, generated=n,
                       cpu_seconds=statistics.median(c for _, c in times[(kind, mode)]),
                       wall_seconds=statistics.median(w for w, _ in times[(kind, mode)]),
                       mean_in_flight=st.get("mean_in_flight"),
                       layer_passes_per_decoded_token=st.get("layer_passes_per_decoded_token"),
                       block_rows_per_call=st.get("block_rows_per_call"),
                       kv_peak_entry_mib=st.get("kv_peak_entry_bytes", 0) / 2**20,
                       kv_peak_page_mib=st.get("kv_peak_page_bytes", 0) / 2**20,
                       preemptions=st.get("preemptions"))
            rows.append(row)
            f = lambda v, w, p=2, x="x": f"{v:{w}.{p}f}{x}" if v is not None else " " * (w + len(x))
            print(f"{kind:9s} {mode:12s} {s:9.1f} {wall[(kind, mode)]:10.1f} {f(row['vs_vanilla'], 9)} "
                  f"{f(vs_sync if mode == 'depthwise' else None, 7)} "
                  f"{f(vs_hf if mode == 'depthwise' else None, 5)} "
                  f"{f(row['mean_in_flight'], 9, 1, '')} {f(row['layer_passes_per_decoded_token'], 10, 2, '')} "
                  f"{f(row['block_rows_per_call'], 10, 1, '')} {row['kv_peak_entry_mib']:7.1f} "
                  f"{row['kv_peak_page_mib']:9.1f} {row['preemptions'] if row['preemptions'] is not None else '':>7}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if args.profile:
        last = args.batches.split(",")[-1]
        for kind in ("vanilla", "mor3"):
            if kind in models:
                for mode in ("depthwise", "synchronous"):
                    profile(models[kind], reqs[:32], last, mode, args, f"{kind} {mode}")


def profile(model, reqs, batch, schedule, args, label, top: int = 12):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine(model, reqs, batch, schedule, args.kv_budget_mb, args.budget_batch)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile {label} ({len(reqs)} requests, batch {batch}): {total / 1e3:.0f} ms self CPU")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.key:40s} {e.self_cpu_time_total / 1e3:8.1f} ms "
              f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.count:6d} calls")


if __name__ == "__main__":
    main()
