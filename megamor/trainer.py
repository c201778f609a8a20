"""The trainer: builds the parts in dependency order and runs megatron's pipeline schedules.

    device + shims -> process groups -> data -> model stage -> DDP -> optimizer -> LR schedule
    loop: forward/backward over the micro-batches (1F1B when pp > 1) -> grad finalisation
          (shared-layer copies, data parallel, tied embeddings) -> clip + AdamW step -> router
          bias update -> log line (closes a dead-token window; router warnings) -> depth map
          (forward-only pass, at its interval) -> checkpoint
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megamor import parallel, watchdog
from megamor.config import Config, save_config
from megamor.data import BatchLoader, GlobalBatchSampler, get_batch
from megamor.model import build_stage, padded_vocab_size, plan_for, transformer_config
from megamor.model.mor_model import MEAN_STATS, dead_token_ratios, fp8_padded
from megamor.flops import flops_per_step, peak_flops_per_device
from megamor.console import (MfuWindow, banner, checkpoint_line, mlflow_location,
                             parameter_count, silence_expected_megatron_noise, summary_line)
from megamor.tracking import create_tracker
from megamor.checkpoint import EXIT_PREEMPTED, OPTIMIZER_FORMAT, Checkpointer, atomic_write
from megamor.lifecycle import PREEMPTED_MARKER, STOP_SIGNALS, InterruptCounter, exit_with_launcher
from megamor.step_health import (NonFiniteError, RouterAlerts, StepHealth, local_nonfinite,
                                 nonfinite_anywhere)
from megamor.progress import Progress
from megamor.stragglers import Stragglers, line_part
from megamor.schedule import build_scheduler, plan_resume, saved_schedule
from megamor.shims import install_cpu_shims, install_optimizer_fixes, seed_model_parallel_rng
from megamor.device import resolve_device
from megamor.precision import resolve_precision, wrap_for_precision



def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def router_alerts(m: dict, tokens_per_step: int) -> list[tuple[str, str]]:
    """Early warnings of router collapse from one step's (global) statistics: (kind, text)."""
    out = []
    for k, v in m.items():
        if k.startswith("router/depth") and k.endswith("/tokens") and v < 0.01 * tokens_per_step:
            out.append((k, f"router collapse: {k.split('/')[1]} received "
                           f"{100 * v / tokens_per_step:.2f}% of the tokens at step {m['step']}"))
        if k.endswith("sampling_acc") and m["step"] > 100 and v < 0.6:
            out.append((k, f"{k}: threshold routing agrees with top-k on only {100 * v:.0f}% of "
                           f"tokens at step {m['step']}; inference routing will differ"))
    dead, chance = m.get("router/dead_token_ratio"), m.get("router/dead_token_ratio_chance", 0.0)
    if dead is not None and dead > chance + 0.05:
        out.append(("router/dead_token_ratio",
                    f"router collapse: {100 * dead:.1f}% of sequence positions were never "
                    f"selected past recursion step 1 in the window ending at step {m['step']} "
                    f"(chance level {100 * chance:.1f}%)"))
    return out


def router_warnings(m: dict, tokens_per_step: int) -> list[str]:
    return [text for _, text in router_alerts(m, tokens_per_step)]


class Preempted(SystemExit):
    """Raised on every rank after the signal-triggered checkpoint; exit code EXIT_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step

def open_dataset(cfg: Config):
    """The tokenizer and the training samples: one prepared dataset, a weighted blend
    (`data.path="0.7:/a,0.3:/b"`), or the embedded corpus (built on first use)."""
    from tokenizer import load_tokenizer
    from megamor.data import (builtin_dataset_root, ensure_builtin_dataset, open_training_data,
                              parse_data_spec)

    if cfg.data.path == "builtin":
        base = Path(os.path.expanduser(cfg.data.builtin_root))
        root = builtin_dataset_root(base, cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
        ensure_builtin_dataset(root, cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
        spec = str(root)
    else:
        spec = cfg.data.path
    tok = load_tokenizer(cfg.data.tokenizer or Path(parse_data_spec(spec)[0].path) / "tokenizer")
    train = open_training_data(spec, cfg.model.seq_length, tok.fingerprints, seed=cfg.data.seed,
                               on_corrupt=cfg.data.on_corrupt)
    return tok, train


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        # Step and phase for the hang watchdog (megamor/watchdog.py), from the start.
        self.progress = Progress.from_env(int(os.environ.get("RANK", "0")))
        self._signal: Optional[int] = None
        self._interrupts = InterruptCounter()
        if cfg.checkpoint.save_on_signal:
            # Installed first: a signal during start-up is honoured after the first step.
            for s in STOP_SIGNALS:
                signal.signal(s, self._on_signal)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun task
            exit_with_launcher(int(os.environ["RANK"]))
        self.device = resolve_device(cfg)
        if self.device.type == "cpu":
            install_cpu_shims()
        self.dtype, self.fp8 = resolve_precision(cfg, self.device)
        p = cfg.parallel
        timeout_s, _ = watchdog.prepare_collectives(cfg, self.device.type)  # run.hang_timeout
        self.dims = parallel.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                        self.device, timeout_s=timeout_s)
        cfg.validate(world_size=self.dims.world_size)
        torch.manual_seed(cfg.train.seed)
        seed_model_parallel_rng(cfg.train.seed, self.dims.tp_rank)
        self.tokenizer, self.dataset = open_dataset(cfg)
        vocab = cfg.model.vocab_size or self.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                            p.tensor_model_parallel_size)
        self._build_model()
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dims.dp)
        self.sampler = GlobalBatchSampler(len(self.dataset), t.global_batch_size, t.micro_batch_size,
                                          self.dims.dp, self.dims.dp_rank, cfg.data.seed)
        # This rank's micro-batches of step k, read ahead in a background thread.
        self.batches = BatchLoader(self.dataset, self.sampler, prefetch_steps=cfg.data.prefetch_steps)
        self.step = 0
        self.consumed_samples = 0
        self.history: list[dict] = []
        self.tracking_run_id: Optional[str] = None
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(self.checkpoint_root, ck.keep_last, ck.keep_every, ck.async_save)
        # Verified against its checksums; the checkpoint root claimed (megamor/lineage.py).
        self.resumed_from = self.checkpointer.select(ck.resume, ck.new_lineage)
        self.initialised_from: Optional[Path] = None
        self.health = StepHealth(t.on_nonfinite, t.max_nonfinite_in_row,
                                 cfg.tracking.loss_spike_factor)
        self.router_alerts = RouterAlerts()
        self._restore()
        self.tracker = create_tracker(cfg.tracking.enabled, self.dims.rank == 0)
        # Dead-token window: per-position selection counts since the last log line (all ranks).
        self._window_positions: Optional[torch.Tensor] = None
        self._window_sequences = 0
        self.depth_map_ids = self._depth_map_ids()
        precision = "fp8" if self.fp8 else ("bf16" if self.dtype == torch.bfloat16 else "fp32")
        self.precision = precision
        # Peak FLOP/s per device for MFU, on the logging rank only. On the CPU it is measured,
        # once, while the other ranks wait at a barrier (not competing for the cores); the logged
        # MFU is the average over the last log_interval steps.
        measured = self.device.type == "cpu" and not cfg.tracking.peak_flops
        if measured:
            dist.barrier()
        self.peak_flops = (peak_flops_per_device(precision, cfg.tracking.peak_flops)
                           if self.dims.rank == 0 else None)
        if measured:
            dist.barrier()
        self._mfu_window = MfuWindow(cfg.train.log_interval)
        silence_expected_megatron_noise()
        self.stragglers = Stragglers(self.dims, self.device, cfg.tracking.straggler_threshold,
                                     cfg.tracking.straggler_windows, self.measures_collective_wait)
        if self.stragglers.enabled:
            self.progress.listeners.append(self.stragglers.sections.mark)

    engine = "megatron"
    measures_collective_wait = True  # the gradient sync is a phase of its own (stragglers.py)

    def _restore(self) -> None:
        """Resume (wins: a requeued job continues its own run) or start from given weights."""
        if self.resumed_from is not None:
            self.checkpointer.load(self, self.resumed_from)
        elif self.cfg.checkpoint.init_from:
            self.initialised_from = self.checkpointer.load_weights(self, self.cfg.checkpoint.init_from)

    def reload_weights(self) -> None:
        """After `checkpoint.init_from` wrote the stage's weights: the optimizer's main (fp32)
        copies follow them."""
        self.optimizer.reload_model_params()

    def save_engine_state(self, directory: Path) -> None:
        """Engine state kept outside the sharded state dict (the megatron engine has none)."""

    @property
    def checkpoint_root(self) -> Path:
        from megamor.preflight import checkpoint_root
        return checkpoint_root(self.cfg)

    # ------------------------------------------------------------------ construction

    def _build_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        cfg, dims = self.cfg, self.dims
        self.tcfg = transformer_config(cfg, self.dtype, self.fp8, device_type=self.device.type)
        self.plan, self.ranges = plan_for(cfg, self.vocab_size)
        model = build_stage(cfg, self.tcfg, self.vocab_size, dims.pp_rank, cfg.train.seed,
                            dp_group=dims.dp_group)
        model.to(self.device)
        self.stage = model
        parallel.create_shared_layer_groups(dims, self.plan, self.ranges, model)
        model = wrap_for_precision(self.tcfg, model)  # bf16: Float16Module, fp32 routers
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        self.model = DistributedDataParallel(self.tcfg, ddp_cfg, model)
        t = cfg.train
        ocfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        install_optimizer_fixes()
        self.optimizer = get_megatron_optimizer(ocfg, [self.model])
        self.scheduler = build_scheduler(self.optimizer, t)
        self.schedule_note: Optional[str] = None  # set when a resume extends or re-plans it
        from megatron.core.process_groups_config import ProcessGroupCollection
        # The tied embedding's gradient is summed with the other shared copies
        # (parallel.allreduce_shared_grads); megatron's own embedding all-reduce is switched off
        # by giving its grad finaliser an embedding group of one rank.
        self._finalize_groups = ProcessGroupCollection.use_mpu_process_groups()
        if self.dims.pp > 1:
            self._finalize_groups.embd, _ = dist.new_subgroups(group_size=1)
        self.tcfg.no_sync_func = self.model.no_sync
        self.tcfg.finalize_model_grads_func = self._finalize_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss if self.dtype != torch.float32 else None

    def _finalize_grads(self, model_list, num_tokens=None, pg_collection=None, force_all_reduce=False):
        from megatron.core.distributed import finalize_model_grads
        self.progress.enter("grad_sync", self.step + 1)
        parallel.allreduce_shared_grads(self.model, self.dims)
        return finalize_model_grads(model_list, num_tokens, pg_collection=self._finalize_groups,
                                    force_all_reduce=force_all_reduce)

    # ------------------------------------------------------------------ one step

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(self.device) if self.dims.first_stage else None
        labels = batch["labels"].to(self.device) if self.dims.last_stage else None
        output = model(input_ids=tokens, labels=labels)
        return output, self._loss

    @staticmethod
    def _loss(per_token: torch.Tensor):
        loss = per_token.float().mean()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"lm_loss": loss.detach().clone()}

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, dims = self.cfg, self.dims
        t0 = time.perf_counter()
        self.progress.enter("data", self.step + 1)
        batches = iter(self.batches.get(self.step))
        self.stage.aux_loss_scale = 1.0 / self.num_microbatches
        self.stage.reset_stats()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        wire = self.stage.wire_channels

        def adjust_shapes(recv, send):
            return [(s[0], s[1], wire) for s in recv], [(s[0], s[1], wire) for s in send]

        self.progress.enter("forward_backward", self.step + 1)
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=batches, model=[self.model],
            num_microbatches=self.num_microbatches, seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size, forward_only=False,
            adjust_tensor_shapes_fn=adjust_shapes if dims.pp > 1 else None)
        self.progress.enter("optimizer", self.step + 1)
        # A NaN or infinity in any rank's loss or gradients: no update (megamor/step_health.py).
        skipped = nonfinite_anywhere(local_nonfinite([l["lm_loss"] for l in losses],
                                                     self._grad_tensors()), self.device)
        if skipped:
            ok, grad_norm = False, float("nan")
        else:
            ok, grad_norm, _ = self.optimizer.step()
        if ok or skipped:  # a skipped step still advances the LR schedule
            self.scheduler.step(increment=cfg.train.global_batch_size)
        if not skipped:
            self.stage.update_router_bias()
        self.step += 1
        self.consumed_samples += cfg.train.global_batch_size
        self.progress.enter("metrics", self.step)
        metrics = self._reduce_metrics(losses, grad_norm, time.perf_counter() - t0)
        metrics["data_wait_s"] = self.batches.wait_s  # this rank's
        if skipped:
            metrics["nonfinite"] = 1
        self.history.append(metrics)
        return metrics

    def _grad_tensors(self) -> list:
        """This rank's gradients, reduced: DDP's contiguous buffers (one tensor each)."""
        buffers = getattr(self.model, "buffers", None)
        if isinstance(buffers, list):
            return [b.grad_data for b in buffers + list(getattr(self.model,
                                                                "expert_parallel_buffers", []))]
        return [getattr(p, "main_grad", p.grad) for p in self.model.parameters()]

    def _reduce_metrics(self, losses, grad_norm, seconds: float) -> dict:
        """Gather one step's numbers onto every rank: loss from the last stage (mean over data
        parallel), router statistics from whichever stage computed them (sum over pipeline)."""
        dims, cfg, dev = self.dims, self.cfg, self.device
        # Built and reduced on the device (NCCL takes no CPU tensor), then copied to the host once.
        lm = torch.zeros(1, dtype=torch.float64, device=dev)
        if dims.last_stage and losses:
            lm[0] = torch.stack([l["lm_loss"].double() for l in losses]).mean()
        keys = self.stage.stat_keys()
        zero = torch.zeros((), device=dev)
        stats = torch.stack([self.stage.stats.get(k, zero) for k in keys]).double() \
            if keys else torch.zeros(0, dtype=torch.float64, device=dev)
        counts = torch.tensor([self.stage.token_counts.get(i, 0.0) for i in range(len(self.plan.layers))],
                              dtype=torch.float64, device=dev)
        positions = self._position_counts()
        vec = torch.cat([lm, stats, counts, positions.flatten()])
        dist.all_reduce(vec, group=dims.pp_group)
        dist.all_reduce(vec, group=dims.dp_group)
        vec = vec.cpu()  # the step's one device-to-host copy of its statistics
        vec[0] /= dims.dp
        n = len(keys)
        out = {"step": self.step, "loss": float(vec[0]), "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "tokens_per_s": cfg.train.global_batch_size * cfg.model.seq_length / max(seconds, 1e-9),
               "seconds": seconds}
        for k, v in zip(keys, vec[1:1 + n].tolist()):
            # Counts are global sums; losses and accuracies are means per micro-batch.
            out[k] = v / (dims.dp * self.num_microbatches) if k.endswith(MEAN_STATS) else v
        n_layers = len(self.plan.layers)
        layer_tokens = vec[1 + n:1 + n + n_layers].tolist()
        out["layer_tokens"] = layer_tokens
        if positions.numel():
            out.update(self._dead_token_window(vec[1 + n + n_layers:].view_as(positions)))
        total = float(cfg.train.global_batch_size * cfg.model.seq_length)
        for l in self.plan.layers:
            if l.first_in_step:
                out[f"frac/step{l.step}"] = layer_tokens[l.index] / total
        # Throughput from a FLOPs model that charges each step for the tokens it processed.
        fl = flops_per_step(cfg.model, self.plan, layer_tokens, cfg.model.seq_length,
                            cfg.train.global_batch_size, self.vocab_size, cfg.routing)
        out["flops"] = fl["total"]
        out["tflops_per_device"] = fl["total"] / max(seconds, 1e-9) / dims.world_size / 1e12
        if self.peak_flops:
            out["mfu"] = self._mfu_window.add(fl["total"], seconds, dims.world_size,
                                              self.peak_flops)
        out["memory/peak_gb"] = peak_memory_gb(self.device)
        return out

    def _position_counts(self) -> torch.Tensor:
        """[N_r, T] float64 on the device: this stage's per-position selection counts of this step
        (zeros for the steps whose routers live on other stages); empty for models without
        routers."""
        dev = self.device
        if not self.stage.routed:
            return torch.zeros(0, 0, dtype=torch.float64, device=dev)
        nr, t = self.cfg.model.num_recursions, self.cfg.model.seq_length
        pc = self.stage.position_counts
        return torch.stack([pc[r].double() if r in pc
                            else torch.zeros(t, dtype=torch.float64, device=dev)
                            for r in range(1, nr + 1)])

    def logs_at(self, step: int) -> bool:
        """Steps with a console line; each closes a dead-token window."""
        return step % self.cfg.train.log_interval == 0 or step == 1

    def _dead_token_window(self, positions: torch.Tensor) -> dict:
        """Add one step's global per-position counts to the window; at a logged step, return the
        window's dead-token ratios and start a new window."""
        if self._window_positions is None:
            self._window_positions = torch.zeros_like(positions)
        self._window_positions += positions
        self._window_sequences += self.cfg.train.global_batch_size
        if not self.logs_at(self.step):
            return {}
        out = dead_token_ratios(self._window_positions, self._window_sequences)
        self._window_positions, self._window_sequences = None, 0
        return out

    # ------------------------------------------------------------------ checkpoint state

    def sharded_state_dict(self, is_loading: bool) -> dict:
        model_sd = self.stage.sharded_state_dict()
        if self.cfg.parallel.use_distributed_optimizer:
            opt_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=dict(OPTIMIZER_FORMAT))
        else:
            opt_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        return {"model": model_sd, "optimizer": opt_sd}

    def checkpoint_meta(self) -> dict:
        from megamor.checkpoint import SHAPE_FIELDS, now, rng_state
        m, p = self.cfg.model, self.dims
        return {
            "format": 1, "saved_at": now(), "step": self.step, "engine": self.engine,
            "consumed_samples": self.consumed_samples,
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "model": {k: getattr(m, k) for k in SHAPE_FIELDS},
            "layout": {"tp": p.tp, "pp": p.pp, "dp": p.dp},
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            # The tracker's: a run created after start-up (the store was down then) is continued.
            "tracking_run_id": self.tracker.run_id or self.tracking_run_id,
            "step_health": self.health.state(),
        }

    def load_loaded_state(self, loaded: dict, meta: dict) -> None:
        from megamor.checkpoint import CheckpointError
        if not self.tokenizer.matches(meta.get("tokenizer_fingerprint")):
            raise CheckpointError(
                f"{self.resumed_from}: saved with tokenizer {meta.get('tokenizer_fingerprint')}, "
                f"the data now uses {self.tokenizer.fingerprint}")
        self.stage.load_state_dict(loaded["model"], strict=True)
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.restore_trainer_state(meta)

    def restore_trainer_state(self, meta: dict) -> None:
        """Step, data position, LR schedule (kept, extended or re-planned), RNG and tracking run
        of a checkpoint, after the engine restored weights and optimizer state."""
        from megamor.checkpoint import set_rng_state
        t = self.cfg.train
        for group in self.optimizer.param_groups:  # restored with the saved run's values
            group["max_lr"], group["min_lr"] = t.lr, t.min_lr
        saved, saved_state = saved_schedule(self.resumed_from, meta)
        plan = plan_resume(saved, saved_state, self.cfg.train, meta["step"], self.resumed_from)
        if plan.action == "keep":
            self.scheduler.load_state_dict(saved_state)
        else:  # the configured schedule, at the saved position
            self.scheduler.step(increment=saved_state["num_steps"])
            self.schedule_note = plan.message
        set_rng_state(meta["rng"])
        self.health.load(meta.get("step_health"))
        self.step, self.consumed_samples = meta["step"], meta["consumed_samples"]
        self.tracking_run_id = meta.get("tracking_run_id")

    def router_warnings(self, m: dict) -> list[tuple[str, str]]:
        return router_alerts(m, self.cfg.train.global_batch_size * self.cfg.model.seq_length)

    # ------------------------------------------------------------------ depth maps

    def _depth_map_ids(self) -> list[int]:
        """The fixed sample of the periodic depth maps: `tracking.depth_map_text`, else the first
        training sequence (the same on every rank)."""
        text = self.cfg.tracking.depth_map_text
        if text:
            return self.tokenizer.encode(text)[: self.cfg.model.seq_length]
        return get_batch(self.dataset, [0])["tokens"][0].tolist()

    def depth_map_due(self, step: int) -> bool:
        """`tracking.depth_map_interval`: None = with every checkpoint save (periodic and final),
        0 = never, N = every N steps. Routed models only (the others have one depth)."""
        t, c = self.cfg.tracking, self.cfg.checkpoint
        if not self.stage.routed or not self.depth_map_ids:
            return False
        if t.depth_map_interval is None:
            return bool(c.save_interval and step % c.save_interval == 0) or step == self.cfg.train.train_steps
        return t.depth_map_interval > 0 and step % t.depth_map_interval == 0

    def routing_depths(self, ids: list[int]) -> Optional[list[int]]:
        """Recursion depth of each token of `ids` under inference (threshold) routing, through the
        model as it is laid out: one forward-only pass of megatron's schedule (every rank takes
        part); each stage records the routing of the steps whose routers it holds, and the records
        of a pipeline are gathered. Returns the depths on global rank 0, None elsewhere.
        Training is left as it was: no gradients, train mode, RNG state and router statistics
        restored."""
        from megamor.checkpoint import rng_state, set_rng_state
        from megamor.inference import depths_from_trace

        stage, dims = self.stage, self.dims
        tokens = torch.tensor([fp8_padded(ids, self.tcfg)], device=self.device)  # [1, s']
        saved = (stage.stats, stage.token_counts, stage.position_counts)
        rng, was_training = rng_state(), self.model.training
        stage.reset_stats()
        stage.trace_routing = True
        self.model.eval()
        try:
            with torch.no_grad():
                self._forward_only(tokens)
            trace = {r: m[:len(ids), 0].tolist() for r, m in stage.routing_trace.items()}
        finally:
            stage.trace_routing = False
            self.model.train(was_training)
            stage.reset_stats()
            stage.stats, stage.token_counts, stage.position_counts = saved
            set_rng_state(rng)
        traces = [None] * dims.pp
        dist.all_gather_object(traces, trace, group=dims.pp_group)
        if dims.rank != 0:
            return None
        return depths_from_trace({r: t for tr in traces for r, t in tr.items()}, stage.rcfg.type)

    def _forward_only(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> list:
        """One forward of `tokens` [b, s] through the pipeline (megatron's schedule, which also
        marks the first micro-batch: FP8 weight casts are refreshed). With `labels`, returns
        the last stage's [{"lm_loss": mean loss}] (empty elsewhere); without, keeps the logits."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        dims, wire = self.dims, self.stage.wire_channels

        def forward_step(data_iterator, model):
            next(data_iterator)
            if labels is None:
                return model(input_ids=tokens if dims.first_stage else None), None  # logits
            return model(input_ids=tokens if dims.first_stage else None,
                         labels=labels if dims.last_stage else None), self._loss

        def adjust_shapes(recv, send):
            return [(s[0], s[1], wire) for s in recv], [(s[0], s[1], wire) for s in send]

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[self.model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True, adjust_tensor_shapes_fn=adjust_shapes if dims.pp > 1 else None)

    def batch_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss of one batch [b, s] under training-mode routing (top-k), on every rank,
        through megatron's schedule (forward only): a direct call of the model would skip the
        schedule's first-micro-batch mark and, under Transformer Engine, reuse the FP8 casts of
        the weights before the last optimizer step. Nothing of training changes: no gradients;
        router statistics, router buffers (loss-free loads) and RNG state are restored."""
        from megamor.checkpoint import rng_state, set_rng_state
        stage, dims = self.stage, self.dims
        saved = (stage.stats, stage.token_counts, stage.position_counts)
        buffers = [(b, b.clone()) for b in stage.buffers()]
        rng, was_training = rng_state(), self.model.training
        stage.reset_stats()
        self.model.train()
        try:
            with torch.no_grad():
                out = self._forward_only(tokens, labels)
        finally:
            self.model.train(was_training)
            stage.stats, stage.token_counts, stage.position_counts = saved
            for b, value in buffers:
                b.copy_(value)
            set_rng_state(rng)
        loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        if dims.last_stage:
            loss[0] = out[0]["lm_loss"].double()
        dist.all_reduce(loss, group=dims.pp_group)  # from the last stage to every stage
        return float(loss.item())

    def log_depth_map(self, out: Path) -> None:
        """Depth map of the fixed sample at this step: `<run>/depth_maps/step_XXXXXXXX.{html,png}`,
        both logged as MLflow artifacts under `depth_maps/`. Every rank takes part in the forward;
        rank 0 renders. A rendering failure is reported, never raised (training goes on)."""
        from megamor.depth_map import write_depth_map

        depths = self.routing_depths(self.depth_map_ids)
        if depths is None:
            return
        try:
            pieces = [self.tokenizer.decode([i]) for i in self.depth_map_ids]
            paths = write_depth_map(out / "depth_maps", f"step_{self.step:08d}", pieces, depths,
                                    self.cfg.model.num_recursions,
                                    title=f"recursion depth per token at step {self.step}")
        except Exception as e:  # noqa: BLE001 - observability must not stop training
            print(f"WARNING: depth map at step {self.step} not written: {type(e).__name__}: {e}",
                  flush=True)
            return
        for p in paths:
            self.tracker.log_artifact(p, artifact_path="depth_maps")

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._interrupts.second() and self._signal == signal.SIGINT:
            # A second Ctrl-C (not the same keypress forwarded twice: lifecycle.InterruptCounter):
            # stop now; an unfinished save stays an invisible .tmp directory.
            print("megamor: interrupted twice: stopping without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(130)
        self._signal = signum

    def _signal_agreed(self) -> int:
        """The stop signal (SIGTERM, SIGUSR1 or SIGINT) any rank got, on every rank; 0 if none.
        One tiny all-reduce per step."""
        flag = torch.tensor([float(self._signal or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ------------------------------------------------------------------ loop

    def format_line(self, m: dict) -> str:
        parts = [f"step {m['step']:>5}", f"loss {m['loss']:.4f}"]
        aux = [v for k, v in m.items() if k.endswith("aux_loss")]
        if aux:
            parts.append(f"aux {sum(aux):.4f}")
        if "router/balance_loss" in m:
            parts.append(f"bal {m['router/balance_loss']:.4f}")
        parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:.0f}"]
        # Model TFLOP/s per device (executed FLOPs of the FLOPs model), the figure Megatron
        # users compare; MFU divides it by the peak of the precision that runs.
        parts.append(f"TFLOP/s/dev {m['tflops_per_device']:.3g}")
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        fr = [f"{m[k]:.2f}" for k in sorted(m) if k.startswith("frac/step")]
        if fr:
            parts.append("steps " + "/".join(fr))
        if "router/dead_token_ratio" in m:
            parts.append(f"dead {m['router/dead_token_ratio']:.2f}")
        if line_part(m):
            parts.append(line_part(m))
        return " | ".join(parts)

    def _open_metrics_log(self, out: Path):
        """metrics.jsonl, one line per step, never overwritten (megamor/lineage.py): a fresh start
        moves an old one aside; a resume moves lines after its step to metrics.replaced.jsonl."""
        from megamor.lineage import open_metrics
        return open_metrics(out / "metrics.jsonl", self.step if self.resumed_from else None)

    def _data_description(self) -> str:
        d = self.cfg.data
        if d.path != "builtin":
            return d.path
        from megamor.data import builtin_dataset_root
        root = builtin_dataset_root(Path(os.path.expanduser(d.builtin_root)),
                                    self.cfg.model.seq_length, d.tokenizer_vocab_size)
        return f"builtin (CPython's documentation) at {root}"

    def _save(self) -> Path:
        """A periodic or final save; rank 0 reports it once it is published (`_announce_saved`)."""
        t0 = time.time()
        self.progress.enter("checkpoint", self.step)
        path = self.checkpointer.save(self)
        self._announce_saved()  # an earlier asynchronous save, published as this one started
        self._unannounced = (self.step, path, t0)
        self._announce_saved()
        return path

    def _announce_saved(self) -> None:
        """One line per checkpoint, on rank 0, once its directory is complete (an asynchronous
        save completes during a later step; the time is then from start to publication)."""
        pending = getattr(self, "_unannounced", None)
        if pending is None or self.dims.rank != 0:
            return
        from megamor.checkpoint import META
        step, path, t0 = pending
        meta = path / META
        if meta.is_file() and meta.stat().st_mtime >= t0 - 1.0:  # not an older run's
            print(checkpoint_line(step, path, time.time() - t0), flush=True)
            self._unannounced = None

    def train(self) -> list[dict]:
        cfg = self.cfg
        out = Path(cfg.run.output_dir)
        log = None
        params = parameter_count(self.stage, self.device)  # every rank takes part
        first_step, started = self.step + 1, time.perf_counter()
        if self.dims.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)
            (out / watchdog.HUNG_MARKER).unlink(missing_ok=True)
            log = self._open_metrics_log(out)
            if self.resumed_from is not None:
                print(f"resumed from {self.resumed_from} at step {self.step}", flush=True)
                if cfg.checkpoint.init_from:
                    print(f"checkpoint.init_from={cfg.checkpoint.init_from} not used: resuming",
                          flush=True)
            elif self.initialised_from is not None:
                print(f"initialised the model weights from {self.initialised_from} (fresh "
                      f"optimizer, step 0)", flush=True)
            for line in banner(cfg, self.dims, self.device, self.precision, params,
                               self._data_description(), len(self.dataset), first_step,
                               mlflow_location(cfg, out)):
                print(line, flush=True)
            for line in watchdog.banner_lines(cfg, watched=self.progress.directory is not None):
                print(line, flush=True)
            if self.schedule_note:
                print(f"megamor: {self.schedule_note}", flush=True)
        t = cfg.tracking
        self.tracking_run_id = self.tracker.start(
            out, cfg.to_dict(), tracking_uri=t.tracking_uri, experiment=t.experiment,
            run_name=t.run_name or out.name, run_id=self.tracking_run_id) or self.tracking_run_id
        self.tracker.log_artifact(out / "config.yaml")
        self.tracker.set_tags({"tokenizer_fingerprint": self.tokenizer.fingerprint,
                               "layout": f"tp{self.dims.tp}-pp{self.dims.pp}-dp{self.dims.dp}"})
        if self.schedule_note:
            self.tracker.set_tags({"megamor.schedule": self.schedule_note})
        status = "FAILED"
        interval = cfg.checkpoint.save_interval
        try:
            while self.step < cfg.train.train_steps:
                m = self.train_step()
                self.stragglers.step_done()
                straggler = None
                if self.logs_at(m["step"]):  # every rank: a window's straggler report
                    stats, straggler = self.stragglers.close_window(m["step"])
                    m.update(stats)
                # Non-finite steps counted (stops the run after too many), loss spikes reported.
                stop_error = None
                try:
                    health = self.health.record(m, m.get("nonfinite", 0) == 1,
                                                self.checkpointer.last_saved)
                except NonFiniteError as e:
                    stop_error, health = e, []
                if log is not None:
                    self.router_alerts.add(self.router_warnings(m))
                    alerts = self.router_alerts.close(m["step"]) if self.logs_at(m["step"]) else []
                    if alerts:
                        m["router/warnings"] = len(alerts)
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                    self.tracker.log_metrics(m["step"], m)
                    for w in health:
                        print(f"WARNING: {w}", flush=True)
                    if "loss_spike" in m:
                        self.tracker.set_tags({"megamor.loss_spike": health[-1]})
                    if self.logs_at(m["step"]):
                        line = self.format_line(m)
                        if self.tracker.backlog:  # the tracking store is unreachable or stalled
                            line += f" | mlflow {self.tracker.backlog} metrics buffered"
                        print(line, flush=True)
                        for w in alerts:
                            print(f"WARNING: {w}", flush=True)
                        if alerts:
                            self.tracker.set_tags({"megamor.router_warning": f"step {m['step']}: "
                                                   + " / ".join(alerts)})
                        if straggler:
                            print(f"WARNING: {straggler}", flush=True)
                            self.tracker.set_tags({"megamor.straggler_warning":
                                                   f"step {m['step']}: {straggler}"})
                if stop_error is not None:
                    raise stop_error
                if self.depth_map_due(self.step):
                    self.progress.enter("evaluation", self.step)
                    self.log_depth_map(out)
                self.progress.enter("step_end", self.step)
                self.checkpointer.poll()
                self._announce_saved()
                stop = self._signal_agreed() if cfg.checkpoint.save_on_signal else 0
                if stop:
                    # save() first finishes (publishes) an asynchronous save still in flight.
                    self.progress.enter("checkpoint", self.step)
                    path = self.checkpointer.save(self)
                    self.checkpointer.wait()
                    if self.dims.rank == 0:
                        atomic_write(out / PREEMPTED_MARKER, json.dumps(
                            {"step": self.step, "checkpoint": str(path),
                             "signal": signal.Signals(stop).name}))
                        print(f"{signal.Signals(stop).name}: saved {path} at step {self.step}; "
                              f"exiting with {EXIT_PREEMPTED} (resume with --resume auto)",
                              flush=True)
                    dist.barrier()  # no rank exits before the marker exists
                    status = "KILLED"
                    raise Preempted(self.step)
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
            self.batches.close()
            if log is not None:
                log.close()
                self.tracker.log_artifact(out / "metrics.jsonl")
            summary = self.tracker.finish(status)
            if summary.get("failures") or summary.get("lost_metrics"):
                print(f"tracking: {summary}", flush=True)
        return self.history
