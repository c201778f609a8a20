"""Data path throughput against what a tiny model consumes (not a timed test).

    python benchmarks/data_throughput.py [--corpus-mb 8] [--workers 1,2] [--train-steps 30]

Measures, in one run and one after the other (never concurrently, so they do not
share the cores):

1. ``prepare``: tokens/s and tokens/s per worker of ``prepare_dataset`` on a
   synthetic .jsonl corpus (the embedded pydoc corpus repeated, each copy made
   distinct), with the 1024-entry BPE of the quickstart, seq_length 128;
2. ``loader``: tokens/s that the training loader delivers to 2 data-parallel
   ranks (two processes, each reading its own micro-batches of the tiny preset's
   global batch 16 x 128 from the quickstart's shards, cold: checksums and tar
   indexing included), in-process reads as the trainer does them, and with 2
   DataLoader workers per rank;
3. ``training``: tokens/s of ``megamor pretrain --nproc 2 train.train_steps=N``
   (the tiny MoR preset on the same shards), the median of its per-step
   ``tokens_per_s`` after the first 5 steps;
4. ``reader``: the shard reader alone, side by side in alternating rounds: megamor's
   ``ShardedTokenDataset`` (webdataset's indexed reader, wids) against the same class
   over a hand-written tar-member index (``tarfile`` offsets, ``os.pread``: the reader
   before issue 20), reading every sample of the quickstart's train split in order, cold
   (each shard indexed on first use) and warm (a second pass); checksums off in both.

Prints the figures and the ratios loader / training (the requirement: >= 10),
prepare-per-worker / training, and hand-written / wids reader time.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ = 128
VOCAB = 1024
G, MBS, DP = 16, 4, 2  # the tiny preset's defaults on 2 ranks


def make_corpus(path: Path, megabytes: float) -> int:
    from megamor.data import builtin_corpus

    train, val = builtin_corpus()
    docs = train + val
    n = 0
    copy = 0
    with open(path, "w") as f:
        while n < megabytes * 2 ** 20:
            for i, d in enumerate(docs):
                line = json.dumps({"text": f"[copy {copy} doc {i}]\n{d}"}) + "\n"
                f.write(line)
                n += len(line)
            copy += 1
    return n


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tok/s, with the spread of all runs."""
    runs = sorted(runs, key=lambda r: r["tok_s"])
    out = dict(runs[len(runs) // 2])
    out["tok_s_all"] = [round(r["tok_s"]) for r in runs]
    return out


def bench_prepare(corpus: Path, tok, out: Path, workers: int, repeat: int) -> dict:
    from megamor.data import prepare_dataset

    runs = []
    for _ in range(repeat):
        res = prepare_dataset([str(corpus)], tok, SEQ, out, workers=workers, force=True, progress=False)
        runs.append({"workers": workers, "tokens": res.tokens, "seconds": res.seconds,
                     "tok_s": res.tokens_per_s})
    r = _median_run(runs)
    r["tok_s_per_worker"] = r["tok_s"] / max(workers, 1)
    return r


def _loader_rank(root: str, rank: int, steps: int, workers: int, q) -> None:
    from megamor.data import BatchLoader, GlobalBatchSampler, ShardedTokenDataset

    ds = ShardedTokenDataset(root, "train", expect_seq_length=SEQ)  # cold: nothing indexed yet
    sampler = GlobalBatchSampler(len(ds), G, MBS, DP, rank, seed=1234)
    t0 = time.perf_counter()
    it = iter(BatchLoader(ds, sampler, num_workers=workers))
    for _ in range(steps):
        for mb in next(it):
            assert mb["tokens"].shape == (MBS, SEQ)
    q.put(time.perf_counter() - t0)


def bench_loader(root: Path, steps: int, workers: int, repeat: int) -> dict:
    return _median_run([_bench_loader(root, steps, workers) for _ in range(repeat)])


def _bench_loader(root: Path, steps: int, workers: int) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_loader_rank, args=(str(root), r, steps, workers, q)) for r in range(DP)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode for p in procs):
        raise RuntimeError("a loader rank failed")
    slowest = max(q.get() for _ in procs)
    tokens = steps * G * SEQ  # global tokens delivered (all ranks together)
    return {"workers_per_rank": workers, "steps": steps, "seconds": slowest, "wall_s": wall,
            "tok_s": tokens / slowest}


def _pread_reader_class():
    """``ShardedTokenDataset`` over a hand-written tar index (the reader before issue 20)."""
    import numpy as np

    from megamor.data import ShardedTokenDataset
    from megamor.data.manifest import SAMPLE_EXT

    class Pread:
        def __init__(self, path: Path, entries: list) -> None:
            self.fd, self.entries = os.open(path, os.O_RDONLY), entries

        def close(self) -> None:
            os.close(self.fd)

    class PreadTarReader(ShardedTokenDataset):
        def _open_shard(self, j):
            sh, path = self.info.shards[j], self._shard_path(j)
            first = j * self.info.samples_per_shard
            want = {"%09d.%s" % (first + k, SAMPLE_EXT): k for k in range(sh.num_samples)}
            entries = [None] * sh.num_samples
            with tarfile.open(path, mode="r:") as tf:
                for member in tf:
                    if member.isfile() and (k := want.get(member.name)) is not None:
                        entries[k] = (member.offset_data, member.size)
            return Pread(path, entries), list(range(sh.num_samples))

        def _read_npy(self, j, k, i, what):
            h, _ = self._shard(j)
            offset, size = h.entries[k]
            return np.load(io.BytesIO(os.pread(h.fd, size, offset)), allow_pickle=False)

    return PreadTarReader


def bench_reader(root: Path, repeat: int) -> dict:
    """Seconds to read the train split in order, cold and warm, per reader (medians)."""
    from megamor.data import ShardedTokenDataset

    readers = {"wids": ShardedTokenDataset, "hand-written": _pread_reader_class()}
    times: dict = {name: {"cold": [], "warm": []} for name in readers}
    for r in range(repeat):
        for name in (list(readers) if r % 2 == 0 else list(readers)[::-1]):
            ds = readers[name](root, "train", expect_seq_length=SEQ, verify_checksums=False)
            for phase in ("cold", "warm"):
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                times[name][phase].append(time.perf_counter() - t0)
            ds.close()
    out = {"samples": len(ds), "repeat": repeat}
    for name, t in times.items():
        out[name] = {phase: statistics.median(v) for phase, v in t.items()}
    out["hand_written_over_wids"] = {phase: out["hand-written"][phase] / out["wids"][phase]
                                     for phase in ("cold", "warm")}
    return out


def bench_training(builtin_root: Path, run_dir: Path, steps: int) -> dict:
    cmd = ["megamor", "pretrain", "--nproc", "2", f"train.train_steps={steps}",
           f"run.output_dir={run_dir}", f"data.builtin_root={builtin_root}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rates = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            m = json.loads(line)
            if m.get("step", 0) > 5 and "tokens_per_s" in m:
                rates.append(float(m["tokens_per_s"]))
    if not rates:  # fall back to the log lines
        rates = [float(x) for x in re.findall(r"tok/s (\d+)", proc.stdout)[1:]]
    return {"command": " ".join(cmd), "steps": steps, "wall_s": wall, "tok_s": statistics.median(rates),
            "tok_s_max": max(rates), "samples": len(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--workers", default="1,2", help="prepare worker counts to measure")
    ap.add_argument("--loader-steps", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="prepare/loader runs; the median is shown")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--reader-only", action="store_true", help="only the reader comparison (4.)")
    ap.add_argument("--reader-repeat", type=int, default=20, help="reader rounds (medians shown)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from megamor.data import builtin_dataset_root, ensure_builtin_dataset
    from megamor.tokenizer import load_tokenizer

    results: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="megamor-bench-") as tmp:
        tmp = Path(tmp)
        base = tmp / "builtin"
        root = ensure_builtin_dataset(builtin_dataset_root(base, SEQ, VOCAB), SEQ, VOCAB)
        rd = results["reader"] = bench_reader(root, args.reader_repeat)
        for phase in ("cold", "warm"):
            print(f"reader   {phase}: {rd['samples']} samples of {SEQ}+1 tokens: wids "
                  f"{rd['wids'][phase] * 1e3:.1f} ms, hand-written tar index + pread "
                  f"{rd['hand-written'][phase] * 1e3:.1f} ms: hand-written / wids = "
                  f"{rd['hand_written_over_wids'][phase]:.2f}x (median of {rd['repeat']})", flush=True)
        if args.reader_only:
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            return
        tok = load_tokenizer(root / "tokenizer")
        corpus = tmp / "corpus.jsonl"
        results["corpus_bytes"] = make_corpus(corpus, args.corpus_mb)

        results["prepare"] = [bench_prepare(corpus, tok, tmp / f"prep{w}", int(w), args.repeat)
                              for w in args.workers.split(",")]
        for r in results["prepare"]:
            print(f"prepare  workers={r['workers']}: {r['tokens']:,} tokens in {r['seconds']:.1f} s = "
                  f"{r['tok_s']:,.0f} tok/s, {r['tok_s_per_worker']:,.0f} tok/s per worker "
                  f"(runs: {r['tok_s_all']})", flush=True)

        results["loader"] = [bench_loader(root, args.loader_steps, w, args.repeat) for w in (0, 2)]
        for r in results["loader"]:
            print(f"loader   2 ranks, {r['workers_per_rank']} DataLoader workers per rank: "
                  f"{r['steps']} global batches of {G}x{SEQ} in {r['seconds']:.2f} s = "
                  f"{r['tok_s']:,.0f} tok/s (runs: {r['tok_s_all']})", flush=True)

        if not args.skip_train:
            t = results["training"] = bench_training(base, tmp / "run", args.train_steps)
            print(f"training {t['command']}\n         median {t['tok_s']:,.0f} tok/s "
                  f"(max {t['tok_s_max']:,.0f}; {t['samples']} steps after step 5)", flush=True)
            results["ratios"] = {
                "loader_in_process_over_training": results["loader"][0]["tok_s"] / t["tok_s"],
                "loader_2_workers_over_training": results["loader"][1]["tok_s"] / t["tok_s"],
                "prepare_per_worker_over_training": max(r["tok_s_per_worker"] for r in results["prepare"])
                / t["tok_s"],
            }
            for k, v in results["ratios"].items():
                print(f"ratio    {k}: {v:,.1f}x")
            ok = results["ratios"]["loader_in_process_over_training"] >= 10
            print("loader is not the bottleneck (>= 10x)" if ok else "LOADER TOO SLOW (< 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
