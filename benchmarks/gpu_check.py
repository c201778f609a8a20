"""GPU check: megamor's trainer on one GPU over NCCL, in bf16, against an fp32 reference.

For each model preset and activation-recompute mode: a few training steps through the real
`Trainer` (world size 1, process group `cpu:gloo,cuda:nccl`), then

- every tensor handed to a torch.distributed collective was one NCCL takes: megamor's collective
  guard (megamor/testing/collective_guard.py, the one the tests use) watches the whole run,
  checkpoint save and resume included; object collectives (checkpoint planning) are recorded,
  not judged, as torch correctly runs them on the group's CPU side;
- the losses are finite, and the loss of a fixed batch falls over the run's steps,
- the bf16 model's loss on a batch is within `--tolerance` (relative) of an fp32 copy of the
  same weights on the same batch; the bf16 loss goes through megatron's schedule
  (`Engine.batch_loss`), which under Transformer Engine refreshes the FP8 weight casts,
- tokens/s, model TFLOP/s per GPU (megamor's FLOPs model of what ran), MFU (against the
  datasheet peak of the precision running) and peak GPU memory, from synchronised step times.

The first run also saves a checkpoint and the second (same preset) resumes from it.
Transformer Engine variants run only where TE is importable. The check stops starting runs at
`--deadline-s` (a run that would not finish in time fails the check), and its last line is the
verdict: `gpu_check: PASS ...` or `gpu_check: FAIL ...`. Exit status 0 / 1 (2: no GPU).

    bash benchmarks/gpu_check.sh                  # on the GPU machine (installs carried wheels)
    python benchmarks/gpu_check.py --cpu-smoke    # the same driver on CPU/gloo, tiny shape

`--cpu-smoke` rehearses the GPU program on the CPU: bf16 under megatron's Float16Module
(`MEGAMOR_CPU_BF16=1`), a multi-backend default group (`cpu:gloo,cuda:gloo`, the shape of a GPU
run's `cpu:gloo,cuda:nccl`), the guard judging where each tensor would live on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STARTED = time.perf_counter()

from megamor.testing.collective_guard import OBJECT_CALLS  # noqa: E402 (torch only)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU/gloo, tiny preset, seq 64, bf16 (rehearses the driver and the bf16 "
                         "program, not the GPU)")
    ap.add_argument("--presets", default="135m,1p7b")
    ap.add_argument("--recompute", default="none,full", help="model.recompute modes to run")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timings")
    ap.add_argument("--tolerance", type=float, default=2e-2,
                    help="relative |loss - fp32 loss| allowed for bf16")
    ap.add_argument("--deadline-s", type=float, default=420,
                    help="start no run after this many seconds since the driver started (a run "
                         "not started fails the check); the verdict comes before 8 minutes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"))
    ap.add_argument("--data-root", default=None, help="data.builtin_root (default: megamor's)")
    ap.add_argument("overrides", nargs="*", help="section.option=value for every run")
    a = ap.parse_args()
    if a.cpu_smoke:
        a.presets, a.recompute, a.seq = "tiny", "none,full", 64
        a.micro_batch, a.global_batch, a.steps, a.warmup = 2, 4, 3, 1
    if a.warmup >= a.steps:
        ap.error(f"--warmup={a.warmup} must be below --steps={a.steps}")
    return a


def runs(args) -> list[dict]:
    """(name, overrides) of every run: presets x recompute modes, local backend; then TE
    variants (bf16, fp8) of the first preset where Transformer Engine is importable."""
    device = "cpu" if args.cpu_smoke else "cuda"
    out = []
    for preset in args.presets.split(","):
        for rc in args.recompute.split(","):
            out.append({"name": f"{preset}-{rc}", "preset": preset, "precision": "bf16",
                        "over": [f"model.preset={preset}", f"model.recompute={rc}",
                                 "model.backend=local", "train.precision=bf16",
                                 f"train.device={device}"]})
    if not args.cpu_smoke and importlib.util.find_spec("transformer_engine") is not None:
        first = args.presets.split(",")[0]
        for prec in ("bf16", "fp8"):
            out.append({"name": f"{first}-te-{prec}", "preset": first, "precision": prec,
                        "over": [f"model.preset={first}", "model.backend=te",
                                 f"train.precision={prec}", "train.device=cuda"]})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batch(trainer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first micro-batch of samples 0.. (the same for every run of a shape)."""
    from megamor.data import get_batch

    batch = get_batch(trainer.data.dataset, list(range(trainer.cfg.train.micro_batch_size)))
    return batch["tokens"].to(device), batch["labels"].to(device)


def fp32_loss(trainer, cfg, device, tokens, labels) -> float:
    """The same batch through an fp32 copy of the trainer's current weights (TF32 off), called
    directly: no FP8 there, so no weight casts to refresh."""
    from megamor.model import build_stage, transformer_config

    tcfg = transformer_config(cfg, torch.float32, device_type=device.type)
    tcfg.perform_initialization = False  # the weights are copied in below
    ref = build_stage(cfg, tcfg, trainer.vocab_size, 0, cfg.train.seed).to(device)
    ref.load_state_dict(trainer.engine.stage.state_dict(), strict=True)
    ref.train()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            return ref(input_ids=tokens, labels=labels).float().mean().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        del ref


def run_one(run: dict, args, resume: str | None, guard) -> dict:
    from megamor.config import load_config
    from megamor.flops import peak_flops_per_device
    from megamor.training.loop import Trainer

    over = [*run["over"], f"model.seq_length={args.seq}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.global_batch}", f"train.train_steps={4 * args.steps}",
            "train.lr=1e-3", "train.warmup_steps=1", "train.log_interval=1",
            "tracking.enabled=false", "checkpoint.save_on_signal=false",
            f"run.output_dir={Path(args.out) / run['name']}"]
    if args.data_root:
        over.append(f"data.builtin_root={args.data_root}")
    if resume:
        over.append(f"checkpoint.resume={resume}")
    over += args.overrides  # the caller's word is last
    cfg = load_config(None, over)
    seen, calls_before, inner_before = len(guard.violations), Counter(guard.calls), \
        Counter(guard.inner)
    trainer = Trainer(cfg)  # the guard watches start-up and a resume's load too
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backend = str(dist.get_backend())
    start_step = trainer.step
    tokens, labels = fixed_batch(trainer, device)
    before = trainer.engine.batch_loss(tokens, labels)
    times, metrics = [], []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        metrics.append(trainer.train_step())
        sync(device)
        times.append(time.perf_counter() - t0)
    peak_gib = (torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda" else None)  # training only, before the checks
    saved = None
    if resume is None and run.get("save"):
        saved = str(trainer.checkpointer.save(trainer.run_state))
        trainer.checkpointer.wait()
    low = trainer.engine.batch_loss(tokens, labels)
    full = fp32_loss(trainer, cfg, device, tokens, labels)
    seconds = statistics.median(times[args.warmup:])
    flops = statistics.median(m["flops"] for m in metrics[args.warmup:])
    step_tokens = cfg.train.global_batch_size * cfg.model.seq_length
    peak = peak_flops_per_device(run["precision"], cfg.tracking.peak_flops)
    losses = [m["loss"] for m in metrics]
    calls = Counter(guard.calls) - calls_before
    out = {
        "name": run["name"], "backend": backend, "precision": trainer.precision,
        "resumed_at": start_step if resume else None, "saved": saved, "losses": losses,
        "batch_loss_before": before, "batch_loss": low, "batch_loss_fp32": full,
        "rel_diff": abs(low - full) / abs(full), "seconds_per_step": seconds,
        "tokens_per_s": step_tokens / seconds, "model_tflops_per_gpu": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_memory_gib": peak_gib,
        "violations": guard.violations[seen:],
        "object_collectives": sorted(k for k in calls if k.split(" @")[0] in OBJECT_CALLS),
        "inner_calls": dict(Counter(guard.inner) - inner_before),
    }
    problems = []
    if not all(math.isfinite(l) for l in losses):
        problems.append(f"non-finite loss {losses}")
    elif not low < before:
        problems.append(f"the loss of a fixed batch did not fall over {args.steps} steps: "
                        f"{before:.5f} -> {low:.5f}")
    if not out["rel_diff"] <= args.tolerance:
        problems.append(f"loss {low:.5f} vs fp32 reference {full:.5f}: relative difference "
                        f"{out['rel_diff']:.2e} > {args.tolerance:.0e}")
    if out["violations"]:
        problems.append(f"{len(out['violations'])} collective(s) got a tensor NCCL rejects: "
                        + "; ".join(out["violations"][:3]))
    if device.type == "cuda" and "nccl" not in backend:
        problems.append(f"process group backend {backend!r} has no NCCL")
    if resume and start_step == 0:
        problems.append(f"resume from {resume} started at step 0")
    out["problems"] = problems
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fmt(v, spec):
    """`v` formatted, or a dash of the same width when there is no value (e.g. GPU memory on
    the CPU)."""
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def elapsed() -> float:
    return time.perf_counter() - STARTED


def cpu_rehearsal_group() -> None:
    """--cpu-smoke: bf16 on the CPU, and a default group with a CPU and a "device" backend, as
    megamor's GPU runs have (`cpu:gloo,cuda:nccl`); torch then picks the CPU side for object
    collectives exactly as on a GPU. megamor keeps a group that exists."""
    from megamor.parallel import _free_port
    from megamor.precision import CPU_BF16_ENV

    os.environ[CPU_BF16_ENV] = "1"
    dist.init_process_group(backend="cpu:gloo,cuda:gloo", init_method=f"tcp://127.0.0.1:"
                            f"{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=5))


def verdict(results: list[dict], planned: int, device_name: str, args, probe: dict) -> str:
    failed = [r for r in results if r["problems"]]
    passed = len(results) - len(failed)
    where = f"{passed} of {planned} runs passed on {device_name} in {elapsed():.0f} s"
    if probe != {"host_flagged": 1, "device_passed": True}:
        return f"gpu_check: FAIL: the collective guard is not looking ({probe}); {where}"
    if not failed and passed == planned:
        resumed = next((r["resumed_at"] for r in results if r.get("resumed_at")), None)
        return (f"gpu_check: PASS: {where} (bf16 within {args.tolerance:.0e} of fp32, "
                f"collectives NCCL-legal, resumed at step {resumed})")
    first = failed[0] if failed else None
    why = f"{first['name']}: {first['problems'][0]}" if first else "runs missing"
    return f"gpu_check: FAIL: {where}; {why}"



def main() -> int:
    args = parse_args()
    from megamor.testing import collective_guard

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: FAIL: no CUDA GPU visible (use --cpu-smoke on a CPU machine)",
              flush=True)
        return 2
    if args.cpu_smoke:
        from megamor.shims import install_cpu_shims
        install_cpu_shims()  # before the guard, whose provenance mode must see .cuda() first
    guard = collective_guard.install()  # before megatron is imported
    from megamor import parallel

    if args.cpu_smoke:
        cpu_rehearsal_group()
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    parallel.init_process_group(device)
    probe = guard.probe(None, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results, saved = [], None
    plan = runs(args)
    for i, run in enumerate(plan):
        # The first run saves a checkpoint and the second (same preset, the next recompute mode)
        # resumes from it; larger presets skip this (a 1p7b checkpoint is ~27 GB).
        run["save"] = i == 0
        resume = saved if i == 1 and run["preset"] == plan[0]["preset"] else None
        # A run of this preset takes about as long as the last one did.
        expect = max((r["wall_s"] for r, p in zip(results, plan) if p["preset"] == run["preset"]),
                     default=0.0)
        if elapsed() + expect > args.deadline_s:
            r = {"name": run["name"], "wall_s": 0.0,
                 "problems": [f"not run: {elapsed():.0f} s spent, {expect:.0f} s more would "
                              f"pass --deadline-s {args.deadline_s:.0f}"]}
            results.append(r)
            print(json.dumps(r), flush=True)
            continue
        print(f"=== {run['name']}" + (f" (resuming {resume})" if resume else ""), flush=True)
        t0 = time.perf_counter()
        try:
            r = run_one(run, args, resume, guard)
        except Exception as e:  # noqa: BLE001 - report every run, then fail
            traceback.print_exc()
            r = {"name": run["name"], "problems": [f"{type(e).__name__}: {e}"]}
        r["wall_s"] = time.perf_counter() - t0
        saved = r.get("saved") or saved
        results.append(r)
        print(json.dumps(r), flush=True)
    parallel.shutdown()
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(
        {"probe": probe, "runs": results, "guard": guard.report()}, indent=1))
    device_name = "cpu" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"\nGPU check on {device_name}, torch {torch.__version__}, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, global batch {args.global_batch}, {args.steps} steps "
          f"({args.warmup} untimed)")
    print(f"{'run':<18} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'loss':>8} "
          f"{'vs fp32':>9} {'wall s':>7}  status")
    for r in results:
        ok = not r["problems"]
        print(f"{r['name']:<18} {fmt(r.get('tokens_per_s'), '9.0f')} "
              f"{fmt(r.get('model_tflops_per_gpu'), '8.1f')} "
              f"{fmt(r.get('mfu') and 100 * r['mfu'], '5.1f')}% "
              f"{fmt(r.get('peak_memory_gib'), '9.1f')} "
              f"{fmt(r.get('losses') and r['losses'][-1], '8.4f')} "
              f"{fmt(r.get('rel_diff'), '9.1e')} {r['wall_s']:7.0f}  "
              f"{'ok' if ok else 'FAILED: ' + ' | '.join(r['problems'])}")
    line = verdict(results, len(plan), device_name, args, probe)
    print(line, flush=True)
    return 0 if line.startswith("gpu_check: PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
