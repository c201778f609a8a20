"""One benchmark command for a training step on this machine (issue 13): megamor's vanilla,
recursive and MoR (expert- and token-choice) models side by side, optionally next to the official
MoR implementation on the same shapes, in one run and one report.

    python benchmarks/perf.py                     # the issue-13 shape: batch 8 x 512, hidden 256,
                                                  # middle-cycle, vocab 8192, fp32, one process
    python benchmarks/perf.py --quick             # a short run of every section
    /tmp/venv-official/bin/python benchmarks/perf.py --official /tmp/official   # + the official code
    python benchmarks/perf.py --sections speed,profile --nr 3 --steps 5

Sections (`--sections`, all by default):
- speed: step time (forward, loss, backward, clip, AdamW) of every kind at N_r = 2, 3, 4 (2 + 2 N_r
  unrolled layers), models stepped round-robin so machine noise hits them alike, median of the
  timed steps; FLOPs / vanilla from megamor's FLOPs model at the tokens each layer processed;
  executed model FLOP/s as a fraction of a 2048^3 fp32 matmul timed at the start of the run;
  with --official, its ms per step and megamor's speed relative to it (official ms / megamor ms);
- seq: step time against sequence length at a constant number of tokens per step (batch x seq of
  the speed section), so the growth per token is the attention term's;
- memory: saved-activation bytes and peak RSS of one forward + backward per kind, without and with
  full (per-layer) recomputation, each in a fresh process (benchmarks/recompute_memory.py);
- pipeline: per-stage busy CPU time at PP 2 and 4, expert-choice, trainer level on gloo ranks,
  predicted against measured (benchmarks/pipeline_balance.py, its own shape);
- profile: torch.profiler of one vanilla and one MoR expert-choice step: top ops by self CPU time,
  the matmul and attention shares.
Results and their reading: docs/performance.md ("One command").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_mor  # noqa: E402
import pipeline_balance  # noqa: E402
import recompute_memory  # noqa: E402
from step_speed import (KINDS, add_shape_args, build, round_robin, shape, step,  # noqa: E402
                        step_flops)

from megamor import parallel  # noqa: E402
from megamor.flops import measure_cpu_peak_flops  # noqa: E402
from megamor.shims import install_cpu_shims, seed_model_parallel_rng  # noqa: E402

SECTIONS = ("speed", "seq", "memory", "pipeline", "profile")
QUICK = {"batch": 2, "seq": 256, "nr": "3", "steps": 2, "warmup": 1, "seqs": "256,512",
         "seq_steps": 1, "pp": "2", "pp_steps": 1}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def official_step(model, loss_fn, opt, ids) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(ids).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False)


def time_kinds(args, nr: int, seq: int, batch: int, steps: int, warmup: int) -> dict:
    """Every kind (and, with --official, its official counterpart) at one shape, round-robin:
    {name: {"ms": median ms per step, "gflop": model GFLOP per step}}."""
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (batch, seq))
    runs = {k: build(shape(args, nr, seq) + ov, args.vocab) for k, ov in KINDS.items()}
    fns = {k: (lambda m=m, o=o: step(m, o, ids)) for k, (_, m, o) in runs.items()}
    if args.official:
        caps = runs["mor_expert"][0].routing.capacities(nr)
        for kind in official_mor.KINDS:
            model, loss_fn = official_mor.build(
                args.official, kind, hidden=args.hidden, heads=args.heads, groups=args.groups,
                ffn=args.ffn, vocab=args.vocab, seq=seq, nr=nr, capacities=caps)
            opt = adamw(model)
            fns[f"official {kind}"] = lambda m=model, f=loss_fn, o=opt: official_step(m, f, o, ids)
    times = round_robin(fns, warmup, steps)
    out = {}
    for name, ts in times.items():
        kind = name.split()[-1]
        cfg, model, _ = runs[kind]
        out[name] = {"ms": 1000 * statistics.median(ts),
                     "gflop": step_flops(cfg, model, seq, batch, args.vocab) / 1e9}
    return out


def speed_section(args) -> dict:
    return {int(nr): time_kinds(args, int(nr), args.seq, args.batch, args.steps, args.warmup)
            for nr in args.nr.split(",")}


def seq_section(args) -> dict:
    tokens = args.batch * args.seq
    out = {}
    for seq in (int(s) for s in args.seqs.split(",")):
        batch = max(1, tokens // seq)
        out[seq] = {"batch": batch, "rows": time_kinds(args, args.seq_nr, seq, batch,
                                                       args.seq_steps, 1)}
    return out


def memory_section(args) -> dict:
    settings = {"none": ["model.recompute=none"],
                "full": ["model.recompute=full", "model.recompute_unit=layer"]}
    return {kind: {name: recompute_memory.measure_fresh(shape(args, args.seq_nr, args.seq) + ov + st,
                                                        args.seq, args.batch, args.vocab)
                   for name, st in settings.items()}
            for kind, ov in KINDS.items()}


def pipeline_section(args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        return {int(pp): pipeline_balance.balance(int(pp), args.pp_steps, Path(d))
                for pp in args.pp.split(",")}


def profile_section(args, top: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    out = {}
    for kind in ("vanilla", "mor_expert"):
        cfg, model, opt = build(shape(args, args.seq_nr, args.seq) + KINDS[kind], args.vocab)
        step(model, opt, ids)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, opt, ids)
        rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
        total = sum(r[1] for r in rows)
        rows.sort(key=lambda r: -r[1])
        share = lambda pred: sum(r[1] for r in rows if pred(r[0])) / total  # noqa: E731
        out[kind] = {"total_ms": total, "top": rows[:top],
                     "matmul_share": share(lambda n: n in MATMUL_OPS),
                     "attention_share": share(lambda n: "scaled_dot_product" in n)}
    return out


# ----------------------------------------------------------------------------- report

def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def report(args, res: dict) -> str:
    peak = res["peak_flops"]
    out = [f"## perf.py report ({res['date']}, {res['machine']})",
           f"fp32 matmul peak (2048^3, {res['threads']} threads): {peak / 1e9:.0f} GFLOP/s; "
           f"shape batch {args.batch} x seq {args.seq}, hidden {args.hidden}, heads {args.heads} / "
           f"{args.groups} kv groups, ffn {args.ffn}, vocab {args.vocab}, middle-cycle 2 + 2 x N_r "
           f"layers, fp32, one process; load average before / after: {res['load_before']} / "
           f"{res['load_after']}"]
    if "speed" in res:
        out += ["", f"### Step time (median of {args.steps} steps after {args.warmup} warm-up, "
                    "round-robin)"]
        head = ["N_r", "kind", "ms/step", "time/van", "FLOPs/van", "GFLOP", "of peak"]
        if args.official:
            head += ["official ms", "official of peak", "megamor speed"]
        rows = []
        for nr, r in res["speed"].items():
            van = r["vanilla"]
            for kind in KINDS:
                m = r[kind]
                row = [nr, kind, f"{m['ms']:.0f}", f"{m['ms'] / van['ms']:.3f}",
                       f"{m['gflop'] / van['gflop']:.3f}", f"{m['gflop']:.1f}",
                       f"{m['gflop'] * 1e9 / (m['ms'] / 1e3) / peak:.2f}"]
                if args.official:
                    o = r[f"official {kind}"]
                    approx = "~" if kind == "mor_token" else ""
                    row += [f"{o['ms']:.0f}",
                            f"{approx}{o['gflop'] * 1e9 / (o['ms'] / 1e3) / peak:.2f}",
                            f"{o['ms'] / m['ms']:.2f}x"]
                rows.append(row)
        out += _table(head, rows)
        if args.official:
            out.append("official of peak: megamor's FLOPs model for the same shape and kind "
                       "(exact for vanilla, recursive and expert-choice, whose token counts are "
                       "fixed; ~ for token-choice, whose routers differ); megamor speed = official "
                       "ms / megamor ms")
    if "seq" in res:
        out += ["", f"### Step time against sequence length (N_r = {args.seq_nr}, "
                    f"{args.batch * args.seq} tokens per step, median of {args.seq_steps} after 1 "
                    "warm-up)"]
        head = ["seq", "batch", "kind", "ms/step", "x first seq", "FLOPs x first", "of peak"]
        if args.official:
            head += ["official ms", "megamor speed"]
        rows, first = [], None
        for seq, r in res["seq"].items():
            first = first or r["rows"]
            for kind in KINDS:
                m = r["rows"][kind]
                row = [seq, r["batch"], kind, f"{m['ms']:.0f}", f"{m['ms'] / first[kind]['ms']:.2f}",
                       f"{m['gflop'] / first[kind]['gflop']:.2f}",
                       f"{m['gflop'] * 1e9 / (m['ms'] / 1e3) / peak:.2f}"]
                if args.official:
                    o = r["rows"][f"official {kind}"]
                    row += [f"{o['ms']:.0f}", f"{o['ms'] / m['ms']:.2f}x"]
                rows.append(row)
        out += _table(head, rows)
    if "memory" in res:
        out += ["", f"### Memory of one forward + backward (N_r = {args.seq_nr}, batch {args.batch}"
                    f" x {args.seq}, fresh process each; saved = activation bytes autograd holds at "
                    "the end of the forward, weights excluded; peak RSS = resident peak over "
                    "forward + backward minus resident size before it)"]
        rows = []
        for kind, r in res["memory"].items():
            n, f = r["none"], r["full"]
            rows.append([kind, f"{n['saved_mib']:.1f}", f"{f['saved_mib']:.1f}",
                         f"{f['saved_mib'] / n['saved_mib']:.2f}", f"{n['peak_rss_mib']:.1f}",
                         f"{f['peak_rss_mib']:.1f}", f"{f['peak_rss_mib'] / n['peak_rss_mib']:.2f}"])
        out += _table(["kind", "saved MiB", "saved MiB, full recompute", "x", "peak RSS MiB",
                       "peak RSS MiB, full recompute", "x"], rows)
    if "pipeline" in res:
        out += ["", "### Pipeline stage busy time (expert-choice, trainer level, gloo; shape of "
                    "benchmarks/pipeline_balance.py; forward + backward CPU s per stage, best call "
                    f"over {args.pp_steps} steps)", "```"]
        for pp, r in res["pipeline"].items():
            out += pipeline_balance.format_balance(pp, r)
        out.append("```")
    if "profile" in res:
        for kind, p in res["profile"].items():
            out += ["", f"### Profile of one {kind} step (N_r = {args.seq_nr}, self CPU time "
                        f"{p['total_ms']:.0f} ms; matmuls {100 * p['matmul_share']:.0f}%, SDPA "
                        f"attention {100 * p['attention_share']:.0f}%)"]
            out += _table(["op", "self CPU ms", "share", "calls"],
                          [[n, f"{ms:.0f}", f"{100 * ms / p['total_ms']:.1f}%", c]
                           for n, ms, c in p["top"]])
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--official", metavar="PATH",
                    help="checkout of raymin0223/mixture_of_recursions (needs transformers 4.52.4)")
    ap.add_argument("--quick", action="store_true", help="a short run: " + json.dumps(QUICK))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--nr", default="2,3,4", help="N_r values of the speed section")
    ap.add_argument("--seq-nr", type=int, default=3, help="N_r of the seq, memory, profile sections")
    ap.add_argument("--seqs", default="512,1024,2048,4096")
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq-steps", type=int, default=3)
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--pp-steps", type=int, default=4)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.official:
        try:
            args.official = official_mor.check(args.official)
        except official_mor.OfficialError as e:
            ap.error(str(e))
    return args


def run(args) -> dict:
    """Every requested section; the raw results `report` formats."""
    sections = args.sections.split(",")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "threads": torch.get_num_threads(), "load_before": "%.1f %.1f %.1f" % os.getloadavg()}
    install_cpu_shims()
    parallel.initialize(1, 1, torch.device("cpu"))
    seed_model_parallel_rng(0, 0)
    try:
        res["peak_flops"] = measure_cpu_peak_flops(size=2048, repeats=10)
        for name, fn in (("speed", lambda: speed_section(args)),
                         ("seq", lambda: seq_section(args)), ("memory", lambda: memory_section(args)),
                         ("pipeline", lambda: pipeline_section(args)),
                         ("profile", lambda: profile_section(args))):
            if name in sections:
                t0 = time.perf_counter()
                res[name] = fn()
                print(f"[perf] {name}: {time.perf_counter() - t0:.0f} s, load average "
                      "%.1f %.1f %.1f" % os.getloadavg(), file=sys.stderr, flush=True)
                if args.json:  # what a long run measured so far survives an interruption
                    Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    finally:
        parallel.shutdown()
    res["load_after"] = "%.1f %.1f %.1f" % os.getloadavg()
    return res


def main(argv=None) -> int:
    args = parse(argv)
    res = run(args)
    print(report(args, res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
