"""Data and tracking off the training step's critical path (issue 21, items 3 and 4): side by
side in one run, not a timed test.

    python benchmarks/critical_path.py                    # both parts: --steps 4 --rounds 6 ...
    python benchmarks/critical_path.py --part data --read-delay-ms 10 --steps 8 --rounds 3
    python benchmarks/critical_path.py --part tracking --server-delay-s 0.3 --stall-s 15

One process (a world of one, gloo), the tiny MoR preset on the quickstart's embedded corpus
(seq 128, global batch 16), `Trainer.train_step` as the training loop runs it.

1. Data: the time each step waits for its micro-batches (`data_wait_s`, the metric the trainer
   logs) and the step time, with the prefetching `BatchLoader` (data.prefetch_steps=2: a thread
   reads the next steps while this one trains) and without it (prefetch_steps=0: reads on the
   training thread at the start of the step, as before issue 21). Two readers: the plain shard
   reader (page cache warm: reads take ~1 ms a step) and the same reader with a delay per sample
   (`--read-delay-ms`, a sleep that releases the GIL as a read would: a cold page cache or a slow
   network file system). Modes alternate in rounds of `--steps` steps on the same trainer; the
   first step of each round (the prefetch thread restarting at a new step) is left out.
2. Tracking: the wall time of one training-loop iteration (`train_step` then
   `tracker.log_metrics` of its metrics, as `Trainer.train` does) with an MLflow server (a real
   `mlflow server` behind megamor.testing.tracking_server.StallingProxy) that is (a) healthy,
   (b) slow (every request `--server-delay-s` late), (c) stalled (every request held for
   `--stall-s` seconds, longer than the client's 10 s request timeout, then answered) and
   (d) down (every request answered 503 for `--outage-s` seconds), three ways:
   `sync` = megamor's Tracker(background=False) (delivery on the step thread, as before issue
   21), `sender` = Tracker() (the background sender), `mlflow-async` = MLflow's own asynchronous
   logging (`MlflowClient.log_batch(..., synchronous=False)`, what the issue offered as the
   alternative), all with the client settings the Tracker sets (no HTTP retries inside MLflow,
   10 s timeout). (a) and (b) alternate the three in rounds; (c) and (d) happen once for each
   in turn, the loop running until the event ends plus 3 steps; at the end, the steps whose
   `loss` reached the store are counted (after `finish` / waiting for MLflow's futures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


class SlowReads:
    """A dataset whose every sample read takes `delay_s` longer (a sleep, which releases the GIL
    as a read from disk or network does)."""

    def __init__(self, ds, delay_s: float):
        self.ds, self.delay_s = ds, delay_s

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        time.sleep(self.delay_s)
        return self.ds[i]


def make_trainer(tmp: Path, builtin_root: str, steps: int, extra: list[str]):
    from megamor.config import load_config
    from megamor.trainer import Trainer

    cfg = load_config(None, ["model.preset=tiny", "tracking.enabled=false",
                             f"data.builtin_root={builtin_root}", f"run.output_dir={tmp / 'run'}",
                             "train.warmup_steps=1", "train.lr_schedule=constant",
                             f"train.train_steps={steps}", "train.log_interval=1000000", *extra])
    return Trainer(cfg)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- 1. data


def bench_data(trainer, args) -> dict:
    from megamor.data import BatchLoader

    ds, s = trainer.dataset, trainer.sampler
    slow = SlowReads(ds, args.read_delay_ms / 1e3)
    loaders = {
        ("plain", "on the step (prefetch_steps=0)"): BatchLoader(ds, s, prefetch_steps=0),
        ("plain", "prefetched (prefetch_steps=2)"): BatchLoader(ds, s, prefetch_steps=2),
        ("slow", "on the step (prefetch_steps=0)"): BatchLoader(slow, s, prefetch_steps=0),
        ("slow", "prefetched (prefetch_steps=2)"): BatchLoader(slow, s, prefetch_steps=2),
    }
    rows = {k: {"wait": [], "step": [], "read": []} for k in loaders}
    for _ in range(args.rounds):
        for key, loader in loaders.items():
            trainer.batches = loader
            for i in range(args.steps + 1):
                m = trainer.train_step()
                if i:  # the round's first step: the thread (re)starts at this step
                    rows[key]["wait"].append(m["data_wait_s"])
                    rows[key]["step"].append(m["seconds"])
                    rows[key]["read"].append(loader.read_s)
    for loader in loaders.values():
        loader.close()
    out = {}
    for (reader, mode), r in rows.items():
        out[f"{reader} | {mode}"] = {"reader": reader, "mode": mode, "steps": len(r["step"]),
                                     "data_wait_ms": 1e3 * med(r["wait"]),
                                     "data_wait_max_ms": 1e3 * max(r["wait"]),
                                     "read_ms": 1e3 * med(r["read"]),
                                     "step_ms": 1e3 * med(r["step"])}
    for reader in ("plain", "slow"):
        on = out[f"{reader} | on the step (prefetch_steps=0)"]
        pre = out[f"{reader} | prefetched (prefetch_steps=2)"]
        out[f"{reader} ratios"] = {
            "data_wait_on_step_over_prefetched": on["data_wait_ms"] / max(pre["data_wait_ms"], 1e-9),
            "step_on_step_over_prefetched": on["step_ms"] / pre["step_ms"]}
    return out


# ----------------------------------------------------------------------------- 2. tracking


class MlflowAsync:
    """MLflow's own asynchronous logging, used as the Tracker is used by the trainer."""

    def __init__(self, url: str, experiment: str):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(url)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name="mlflow-async").info.run_id
        self.ops, self.settled, self.failed = [], 0, 0

    def log_metrics(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric
        from megamor.tracking import metric_items
        now = int(time.time() * 1000)
        self.ops.append(self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in metric_items(metrics)],
            synchronous=False))

    def settle(self) -> str:
        """Wait for every batch logged so far (delivered or given up); say how many failed."""
        failed, n = 0, len(self.ops) - self.settled
        for op in self.ops[self.settled:]:
            try:
                op.wait()
            except Exception:  # noqa: BLE001 - a batch MLflow gave up on
                failed += 1
        self.settled, self.failed = len(self.ops), self.failed + failed
        return f"{failed} of {n} batches failed (not retried)"

    def finish(self) -> dict:
        self.settle()
        self.client.set_terminated(self.run_id)
        return {"failed_batches": self.failed, "batches": len(self.ops)}


def loop(trainer, sink, n: int) -> list[tuple[int, float]]:
    """`n` iterations of the training loop's step + logging: (step, wall seconds) each."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        m = trainer.train_step()
        sink.log_metrics(m["step"], m)
        out.append((m["step"], time.perf_counter() - t0))
    return out


def bench_tracking(trainer, args, tmp: Path) -> dict:
    from mlflow.tracking import MlflowClient
    from megamor.testing.tracking_server import MlflowServer, StallingProxy
    from megamor.tracking import Tracker

    (tmp / "server").mkdir()
    server = MlflowServer(tmp / "server")
    server.start()
    proxy = StallingProxy(server.url)
    try:
        sinks = {"sync": Tracker(background=False), "sender": Tracker()}
        for name, t in sinks.items():
            t.start(tmp / name, {"bench": {"mode": name}}, tracking_uri=proxy.url,
                    experiment="critical-path", run_name=name)
            t.flush()
            t.settle = lambda t=t: f"{t.pending} metrics still buffered ({t.failures} failed requests so far)" \
                if not t.flush(timeout=60.0) else f"all delivered ({t.failures} failed requests so far)"
        sinks["mlflow-async"] = MlflowAsync(proxy.url, "critical-path")
        out: dict = {"server": {}}
        for case, delay in (("healthy", 0.0), ("slow", args.server_delay_s)):
            proxy.delay_s = delay
            times = {k: [] for k in sinks}
            for _ in range(args.rounds):
                for name, sink in sinks.items():
                    times[name] += [dt for _, dt in loop(trainer, sink, args.steps + 1)[1:]]
            out["server"][case] = {"delay_s": delay, **{
                name: {"step_ms": 1e3 * med(ts), "max_ms": 1e3 * max(ts), "steps": len(ts)}
                for name, ts in times.items()}}
            ref = out["server"][case]["sender"]["step_ms"]
            out["server"][case]["sync_over_sender"] = out["server"][case]["sync"]["step_ms"] / ref
        proxy.delay_s = 0.0
        for sink in sinks.values():
            sink.settle()
        events = {}
        for event, seconds in (("stall", args.stall_s), ("outage", args.outage_s)):
            for name, sink in sinks.items():
                if event == "stall":
                    proxy.stall(seconds)
                else:
                    proxy.outage(seconds)

                def ongoing():
                    return proxy.stalled or proxy.down
                t0, during, steps = time.perf_counter(), [], []
                while ongoing():
                    for step, dt in loop(trainer, sink, 1):
                        steps.append(step)
                        if ongoing():
                            during.append(dt)
                steps += [s for s, _ in loop(trainer, sink, 3)]
                settled = sink.settle()  # nothing of this event in flight when the next starts
                events[(event, name)] = {
                    "event": event, "logging": name, "seconds": seconds, "steps_during": len(during),
                    "settled": settled,
                    "step_ms": 1e3 * med(during) if during else None,
                    "max_step_s": max(during) if during else time.perf_counter() - t0,
                    "steps_logged": steps}
        out["finish"] = {}
        for name, sink in sinks.items():
            rep = sink.finish("FINISHED") if name != "mlflow-async" else sink.finish()
            out["finish"][name] = {k: rep[k] for k in ("lost_metrics", "failed_batches", "batches")
                                   if k in rep}
            arrived = {m.step for m in MlflowClient(server.url).get_metric_history(sink.run_id, "loss")}
            for event in ("stall", "outage"):
                r = events[(event, name)]
                logged = r.pop("steps_logged")
                r.update({"logged": len(logged), "arrived": sum(1 for s in logged if s in arrived)})
        out["events"] = list(events.values())
        return out
    finally:
        proxy.close()
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("data", "tracking", "both"), default="both")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--read-delay-ms", type=float, default=10.0, help="per sample, slow reader")
    ap.add_argument("--server-delay-s", type=float, default=0.3, help="per request, slow server")
    ap.add_argument("--stall-s", type=float, default=15.0)
    ap.add_argument("--outage-s", type=float, default=5.0)
    ap.add_argument("--builtin-root", default="~/.cache/megamor/builtin")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    res: dict = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="megamor-critical-") as tmp:
        tmp = Path(tmp)
        trainer = make_trainer(tmp, os.path.expanduser(args.builtin_root), 100_000, [])
        trainer.train_step()  # first-step costs out of the way
        trainer.batches.close()  # each part below sets its own loaders
        if args.part in ("data", "both"):
            res["data"] = d = bench_data(trainer, args)
            print(f"Data: tiny preset, global batch {trainer.cfg.train.global_batch_size} x "
                  f"{trainer.cfg.model.seq_length}, one process; medians of {args.rounds} x "
                  f"{args.steps} steps per row; slow reader: +{args.read_delay_ms:g} ms per sample")
            print("| reader | input | data wait / step | max | read / step | step |")
            print("|---|---|---|---|---|---|")
            for k, r in d.items():
                if "ratios" in k:
                    continue
                print(f"| {r['reader']} | {r['mode']} | {r['data_wait_ms']:.2f} ms | "
                      f"{r['data_wait_max_ms']:.2f} ms | {r['read_ms']:.1f} ms | {r['step_ms']:.0f} ms |")
            for reader in ("plain", "slow"):
                r = d[f"{reader} ratios"]
                print(f"{reader}: data wait on the step / prefetched = "
                      f"{r['data_wait_on_step_over_prefetched']:.0f}x; step time on the step / "
                      f"prefetched = {r['step_on_step_over_prefetched']:.2f}x")
        if args.part in ("tracking", "both"):
            res["tracking"] = t = bench_tracking(trainer, args, tmp)
            print(f"Tracking: one loop iteration (train_step + log_metrics), medians of "
                  f"{args.rounds} x {args.steps} per cell")
            print("| server | sync (step thread) | sender thread | MLflow async | sync / sender |")
            print("|---|---|---|---|---|")
            for case, r in t["server"].items():
                label = case if not r["delay_s"] else f"{case} (+{r['delay_s']:g} s per request)"
                print(f"| {label} | {r['sync']['step_ms']:.0f} ms (max {r['sync']['max_ms']:.0f}) | "
                      f"{r['sender']['step_ms']:.0f} ms (max {r['sender']['max_ms']:.0f}) | "
                      f"{r['mlflow-async']['step_ms']:.0f} ms (max {r['mlflow-async']['max_ms']:.0f}) | "
                      f"{r['sync_over_sender']:.2f}x |")
            print(f"Server stalled {args.stall_s:g} s (every request held, then answered; client "
                  f"timeout 10 s), then down {args.outage_s:g} s (every request answered 503):")
            print("| event | logging | steps during it | median step | longest step | steps logged "
                  "| of which in the store at the end | right after the event |")
            print("|---|---|---|---|---|---|---|---|")
            for r in t["events"]:
                med_ms = f"{r['step_ms']:.0f} ms" if r["step_ms"] is not None else "-"
                print(f"| {r['event']} {r['seconds']:g} s | {r['logging']} | {r['steps_during']} | "
                      f"{med_ms} | {r['max_step_s']:.1f} s | {r['logged']} | {r['arrived']} | "
                      f"{r['settled']} |")
            print(f"finish: {t['finish']}")
    res["load_after"] = os.getloadavg()
    print(f"load average before/after: {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
