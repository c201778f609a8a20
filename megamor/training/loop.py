"""The training loop: one for every engine (megamor/engines/). It builds the run's parts in
dependency order and does everything around a step once:

    device + shims -> process groups -> data -> checkpoint to resume (verified) -> engine
    (model stage, `checkpoint.init_from` weights, wrappers, optimizer) -> LR schedule -> resume
    -> tracker, depth maps, metrics, stragglers
    loop: micro-batches -> engine step (forward/backward, grad sync, clip + AdamW, skipped when
          non-finite) -> LR schedule -> router bias update -> metrics (reduced; a log line closes
          a dead-token window) -> step health -> metrics.jsonl, MLflow, console -> depth map (at
          its interval) -> signals -> checkpoint

Each phase is reported to the hang watchdog (megamor/progress.py); stop signals are agreed by
every rank at the end of a step (megamor/training/signals.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megamor import parallel, watchdog
from megamor.checkpoint import META, Checkpointer, RunState, atomic_write
from megamor.config import Config, save_config
from megamor.console import (banner, checkpoint_line, mlflow_location, parameter_count,
                             silence_expected_megatron_noise, summary_line)
from megamor.device import resolve_device
from megamor.engines import create_engine
from megamor.engines.base import EngineContext
from megamor.flops import peak_flops_per_device
from megamor.lifecycle import EXIT_PREEMPTED, PREEMPTED_MARKER, exit_with_launcher
from megamor.model import padded_vocab_size
from megamor.precision import resolve_precision
from megamor.preflight import checkpoint_root
from megamor.progress import Progress
from megamor.schedule import build_scheduler
from megamor.shims import install_cpu_shims, seed_model_parallel_rng
from megamor.step_health import NonFiniteError, StepHealth
from megamor.stragglers import Stragglers
from megamor.tracking import create_tracker
from megamor.training.data import TrainingData
from megamor.training.depth_maps import DepthMaps
from megamor.training.metrics import Report, StepMetrics
from megamor.training.signals import StopSignals
from megamor.training.state import TrainState


class Preempted(SystemExit):
    """Raised on every rank after the signal-triggered checkpoint; exit code EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class Trainer:
    def __init__(self, cfg: Config, keep_history: bool = True):
        """`keep_history`: `train()` returns every step's metrics (tests, benchmarks, the Python
        API); False keeps only the last step's (`megamor pretrain`: a long run's metrics are in
        metrics.jsonl, not in every rank's memory)."""
        self.cfg = cfg
        self.keep_history = keep_history
        rank = int(os.environ.get("RANK", "0"))
        # Step and phase for the hang watchdog (megamor/watchdog.py), from the start.
        self.progress = Progress.from_env(rank)
        self.signals = StopSignals(cfg.checkpoint.save_on_signal)  # first: see StopSignals
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun task
            exit_with_launcher(rank)

        # device + shims, precision
        self.device = resolve_device(cfg)
        if self.device.type == "cpu":
            install_cpu_shims()
        self.dtype, self.fp8 = resolve_precision(cfg, self.device)
        self.precision = "fp8" if self.fp8 else ("bf16" if self.dtype == torch.bfloat16 else "fp32")

        # process groups
        p, t, ck = cfg.parallel, cfg.train, cfg.checkpoint
        timeout_s, _ = watchdog.prepare_collectives(cfg, self.device.type)  # run.hang_timeout
        self.dims = dims = parallel.initialize(p.tensor_model_parallel_size,
                                               p.pipeline_model_parallel_size, self.device,
                                               timeout_s=timeout_s, vp=p.virtual_pipeline_size)
        cfg.validate(world_size=dims.world_size)
        torch.manual_seed(t.seed)
        seed_model_parallel_rng(t.seed, dims.tp_rank)

        # data
        self.data = TrainingData(cfg, dims)
        self.tokenizer = self.data.tokenizer
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                            p.tensor_model_parallel_size)

        # the checkpoint to resume: verified against its checksums, the checkpoint root claimed
        # (megamor/lineage.py)
        self.checkpointer = Checkpointer(
            checkpoint_root(cfg), ck.keep_last, ck.keep_every, ck.async_save, cfg=cfg,
            tokenizer=self.tokenizer, layout={"tp": dims.tp, "pp": dims.pp, "dp": dims.dp})
        self.resumed_from = self.checkpointer.select(ck.resume, ck.new_lineage)

        # engine: model stage, `checkpoint.init_from` weights (unless resuming), optimizer
        self.engine = create_engine(EngineContext(
            cfg, dims, self.device, self.dtype, self.fp8, self.vocab_size,
            self.data.num_microbatches, self.progress))
        self.initialised_from: Optional[Path] = None
        self.engine.build(self._init_weights if self.resumed_from is None and ck.init_from
                          else None)

        # LR schedule and the state a checkpoint keeps
        self.scheduler = build_scheduler(self.engine.optimizer, t)
        self.health = StepHealth(t.on_nonfinite, t.max_nonfinite_in_row,
                                 cfg.tracking.loss_spike_factor)
        self.state = TrainState(t, self.scheduler, self.health)
        self.run_state = RunState(self.engine, self.state, self.data)
        if self.resumed_from is not None:
            self.checkpointer.load(self.resumed_from, self.run_state)

        # what watches and reports the run
        self.history: list[dict] = []
        self.tracker = create_tracker(cfg.tracking.enabled, dims.rank == 0)
        self.state.tracker = self.tracker  # a checkpoint keeps the id the tracker ended up with
        self.depth_maps = DepthMaps(cfg, self.engine, self.tokenizer, self.data.dataset)
        self.metrics = StepMetrics(cfg, dims, self.device, self.engine.plan, self.vocab_size,
                                   self.data.num_microbatches, self._peak_flops())
        silence_expected_megatron_noise()
        self.stragglers = Stragglers(dims, self.device, cfg.tracking.straggler_threshold,
                                     cfg.tracking.straggler_windows,
                                     self.engine.measures_collective_wait)
        if self.stragglers.enabled:
            self.progress.listeners.append(self.stragglers.sections.mark)
        self._unannounced: Optional[tuple] = None  # a save not yet reported (_announce_saved)

    def _init_weights(self, stage: torch.nn.Module) -> None:
        """`checkpoint.init_from`: its weights into the freshly built stage."""
        self.initialised_from = self.checkpointer.load_weights(self.cfg.checkpoint.init_from,
                                                               stage, self.vocab_size)

    def _peak_flops(self) -> Optional[float]:
        """Peak FLOP/s per device for MFU, on the logging rank only. On the CPU it is measured,
        once, while the other ranks wait at a barrier (not competing for the cores)."""
        measured = self.device.type == "cpu" and not self.cfg.tracking.peak_flops
        if measured:
            dist.barrier()
        peak = (peak_flops_per_device(self.precision, self.cfg.tracking.peak_flops)
                if self.dims.rank == 0 else None)
        if measured:
            dist.barrier()
        return peak

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        gbs = self.cfg.train.global_batch_size
        step = self.state.step + 1
        self.progress.enter("data", step)
        batches = self.data.micro_batches(self.state.step)
        result = self.engine.train_step(batches, step)
        if result.applied or result.skipped:  # a skipped step still advances the LR schedule
            self.scheduler.step(increment=gbs)
        if not result.skipped:
            self.engine.stage.update_router_bias()
        self.state.step = step
        self.data.advance()
        self.progress.enter("metrics", step)
        lr = self.engine.optimizer.param_groups[0]["lr"]
        metrics = self.metrics.reduce(step, result, lr, time.perf_counter() - t0)
        metrics["data_wait_s"] = self.data.wait_s  # this rank's
        if result.skipped:
            metrics["nonfinite"] = 1
        metrics.update(result.extra)
        if not self.keep_history:
            self.history.clear()
        self.history.append(metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _save(self) -> Path:
        """A periodic or final save; rank 0 reports it once it is published (`_announce_saved`)."""
        t0 = time.time()
        self.progress.enter("checkpoint", self.step)
        path = self.checkpointer.save(self.run_state)
        self._announce_saved()  # an earlier asynchronous save, published as this one started
        self._unannounced = (self.step, path, t0)
        self._announce_saved()
        return path

    def _announce_saved(self) -> None:
        """One line per checkpoint, on rank 0, once its directory is complete (an asynchronous
        save completes during a later step; the time is then from start to publication)."""
        if self._unannounced is None or self.dims.rank != 0:
            return
        step, path, t0 = self._unannounced
        meta = path / META
        if meta.is_file() and meta.stat().st_mtime >= t0 - 1.0:  # not an older run's
            print(checkpoint_line(step, path, time.time() - t0), flush=True)
            self._unannounced = None

    def _stop_on_signal(self, signum: int, out: Path) -> None:
        """Every rank: save (finishing an asynchronous save still in flight first), rank 0
        writes the marker the launcher reads, then Preempted."""
        self.progress.enter("checkpoint", self.step)
        path = self.checkpointer.save(self.run_state)
        self.checkpointer.wait()
        name = signal.Signals(signum).name
        if self.dims.rank == 0:
            atomic_write(out / PREEMPTED_MARKER, json.dumps(
                {"step": self.step, "checkpoint": str(path), "signal": name}))
            print(f"{name}: saved {path} at step {self.step}; exiting with {EXIT_PREEMPTED} "
                  f"(resume with --resume auto)", flush=True)
        dist.barrier()  # no rank exits before the marker exists
        raise Preempted(self.step)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        cfg = self.cfg
        out = Path(cfg.run.output_dir)
        first_step, started = self.step + 1, time.perf_counter()
        report = self._start(out)
        status = "FAILED"
        interval = cfg.checkpoint.save_interval
        try:
            while self.step < cfg.train.train_steps:
                m = self.train_step()
                self._after_step(m, report)
                if self.depth_maps.due(self.step):
                    self.progress.enter("evaluation", self.step)
                    self.depth_maps.log(out, self.step, self.tracker)
                self.progress.enter("step_end", self.step)
                self.checkpointer.poll()
                self._announce_saved()
                stop = self.signals.agreed(self.device)
                if stop:
                    try:
                        self._stop_on_signal(stop, out)
                    except Preempted:
                        status = "KILLED"
                        raise
                if interval and self.step % interval == 0 and self.step < cfg.train.train_steps:
                    self._save()
            final = self._save()
            self.checkpointer.wait()
            self._announce_saved()
            self.progress.enter("finishing", self.step)
            status = "FINISHED"
            if self.dims.rank == 0:
                loss = self.history[-1]["loss"] if self.history else None
                print(summary_line(first_step, self.step, time.perf_counter() - started, loss,
                                   final, out), flush=True)
        finally:
            self.data.close()
            if report is not None:
                report.log.close()
                self.tracker.log_artifact(out / "metrics.jsonl")
            summary = self.tracker.finish(status)
            if summary.get("failures") or summary.get("lost_metrics"):
                print(f"tracking: {summary}", flush=True)
        return self.history

    def _after_step(self, m: dict, report: Optional[Report]) -> None:
        """Straggler window, step health (raises NonFiniteError when the run must stop, after
        the step is recorded), then rank 0's record of the step."""
        self.stragglers.step_done()
        straggler = None
        if self.metrics.logs_at(m["step"]):  # every rank: a window's straggler report
            stats, straggler = self.stragglers.close_window(m["step"])
            m.update(stats)
        stop_error = None
        try:
            health = self.health.record(m, m.get("nonfinite", 0) == 1,
                                        self.checkpointer.last_saved)
        except NonFiniteError as e:
            stop_error, health = e, []
        if report is not None:
            report.step(m, health, straggler)
        if stop_error is not None:
            raise stop_error

    def _start(self, out: Path) -> Optional[Report]:
        """Start-up output: config.yaml, stale markers removed, metrics.jsonl opened, the banner
        (rank 0); the tracking run started or continued. Returns rank 0's Report."""
        from megamor.lineage import open_metrics

        cfg, dims = self.cfg, self.dims
        params = parameter_count(self.engine.stage, self.device)  # every rank takes part
        report = None
        if dims.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)
            (out / watchdog.HUNG_MARKER).unlink(missing_ok=True)
            # metrics.jsonl is never overwritten (megamor/lineage.py): a fresh start moves an old
            # one aside; a resume moves lines after its step to metrics.replaced.jsonl.
            log = open_metrics(out / "metrics.jsonl", self.step if self.resumed_from else None)
            report = Report(log, self.tracker, cfg.train.global_batch_size * cfg.model.seq_length,
                            self.metrics.logs_at)
            if self.resumed_from is not None:
                print(f"resumed from {self.resumed_from} at step {self.step}", flush=True)
                if cfg.checkpoint.init_from:
                    print(f"checkpoint.init_from={cfg.checkpoint.init_from} not used: resuming",
                          flush=True)
            elif self.initialised_from is not None:
                print(f"initialised the model weights from {self.initialised_from} (fresh "
                      f"optimizer, step 0)", flush=True)
            for line in banner(cfg, dims, self.device, self.precision, params,
                               self.data.describe(), len(self.data.dataset), self.step + 1,
                               mlflow_location(cfg, out)):
                print(line, flush=True)
            for line in watchdog.banner_lines(cfg, watched=self.progress.directory is not None):
                print(line, flush=True)
            if self.state.schedule_note:
                print(f"megamor: {self.state.schedule_note}", flush=True)
        t = cfg.tracking
        self.state.tracking_run_id = self.tracker.start(
            out, cfg.to_dict(), tracking_uri=t.tracking_uri, experiment=t.experiment,
            run_name=t.run_name or out.name, run_id=self.state.tracking_run_id) \
            or self.state.tracking_run_id
        self.tracker.log_artifact(out / "config.yaml")
        self.tracker.set_tags({"tokenizer_fingerprint": self.tokenizer.fingerprint,
                               "layout": f"tp{dims.tp}-pp{dims.pp}-dp{dims.dp}"})
        if self.state.schedule_note:
            self.tracker.set_tags({"megamor.schedule": self.state.schedule_note})
        return report
