"""What the training loop asks of an engine (megamor/training/loop.py runs both through this).

An engine owns this rank's model stage, what wraps it for data parallelism (megatron's DDP, or
DeepSpeed's ZeRO engine) and the optimizer. The loop owns everything around a step: data, LR
schedule, step counting, health, metrics, console, checkpoints, signals. Per step it hands the
engine the step's micro-batches and gets a `StepResult` back.

    build(init_weights)     the stage (same spec, same seeded initialisation for every engine),
                            `checkpoint.init_from` weights loaded into it, wrappers, optimizer
    train_step(batches, n)  forward/backward over the micro-batches, gradient sync, clipping and
                            the optimizer step (none when a loss or gradient is non-finite)
    forward_only(tokens)    one forward under the engine's wrappers (depth maps, batch_loss)
    checkpoint_meta()       the engine's part of megamor.json
    sharded_state_dict()    weights (+ optimizer state) as megatron dist_checkpointing shards
    save_files(dir)         files the shards do not hold (DeepSpeed's ZeRO state)
    load(path, meta, read)  an exact resume of weights and optimizer state

Building the stage is shared (`build_stage`, the one place a model is built for training), so
both engines train the same model from the same initial weights.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


@dataclass
class EngineContext:
    """What an engine is built from: the parts the loop made before it."""

    cfg: object  # megamor.config.Config
    dims: object  # megamor.parallel.ParallelDims
    device: torch.device
    dtype: torch.dtype
    fp8: bool
    vocab_size: int  # padded
    num_microbatches: int
    progress: object  # megamor.progress.Progress: the engine marks the phases inside a step


@dataclass
class RouterStats:
    """One step's router statistics on this rank: the stage's counters over its micro-batches."""

    keys: list  # every statistic of the whole model (the same list on every rank)
    values: dict  # name -> tensor, those this stage computed
    token_counts: dict  # unrolled layer index -> tokens processed
    position_counts: dict  # recursion step -> [T] per-position selection counts
    routed: bool

    @classmethod
    def of(cls, stage) -> "RouterStats":
        """The statistics of `stage`'s chunks (`stage.parts`: one, or a VirtualStage's V),
        summed where two chunks count the same key."""
        values, tokens, positions = {}, {}, {}
        for part in stage.parts:
            for mine, theirs in ((values, part.stats), (tokens, part.token_counts),
                                 (positions, part.position_counts)):
                for k, v in theirs.items():
                    mine[k] = mine[k] + v if k in mine else v
        return cls(stage.stat_keys(), values, tokens, positions, stage.routed)


@dataclass
class StepResult:
    """What one optimizer step returns to the loop."""

    losses: list  # each micro-batch's mean LM loss (tensors; on the last pipeline stage only)
    grad_norm: Optional[float]
    skipped: bool  # a non-finite loss or gradient: no update reached the weights
    applied: bool  # the optimizer applied an update (the LR schedule advances if applied or skipped)
    router: RouterStats
    extra: dict = field(default_factory=dict)  # the engine's own metrics (e.g. zero3/*)


class Engine:
    """Base of the engines: the shared stage build and what every engine does the same way."""

    name = "?"
    # The gradient sync is a phase of its own (megamor/stragglers.py measures the wait in it).
    measures_collective_wait = True

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self.cfg, self.dims, self.device = ctx.cfg, ctx.dims, ctx.device
        self.num_microbatches = ctx.num_microbatches
        self.stage = None  # this rank's MoRModel (or VirtualStage of MoRModel chunks)
        self.model = None  # what forward/backward run on (the stage under the engine's wrappers)
        self.optimizer = None

    # ------------------------------------------------------------------ build

    def build_stage(self):
        """The one place a model is built for training: this rank's pipeline stage from the
        spec tree, its seeded initialisation, on the device, and the groups that keep copies of
        shared layers identical across stages."""
        from megamor import parallel
        from megamor.model import build_stage, plan_for, transformer_config

        cfg, dims, ctx = self.cfg, self.dims, self.ctx
        self.tcfg = transformer_config(cfg, ctx.dtype, ctx.fp8, device_type=self.device.type)
        # pieces[p]: stage p's chunks as [start, stop) unrolled layers (one without a virtual
        # pipeline)
        self.plan, self.pieces = plan_for(cfg, ctx.vocab_size)
        stage = build_stage(cfg, self.tcfg, ctx.vocab_size, dims.pp_rank, cfg.train.seed,
                            dp_group=dims.dp_group)
        stage.to(self.device)
        parallel.create_shared_layer_groups(dims, self.plan, self.pieces, stage)
        self.stage = stage
        return stage

    def build(self, init_weights: Optional[Callable[[torch.nn.Module], None]] = None) -> None:
        """Build the stage, let `init_weights(stage)` load `checkpoint.init_from` weights into
        it, wrap it and build the optimizer (whose copies follow those weights)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ one step

    def begin_step(self) -> None:
        """Router statistics from zero, auxiliary losses scaled per micro-batch, train mode."""
        self.stage.aux_loss_scale = 1.0 / self.num_microbatches
        self.stage.reset_stats()
        self.model.train()

    def train_step(self, batches: Iterable[dict], step: int) -> StepResult:
        """Forward/backward over the step's micro-batches (`{"tokens", "labels"}` [b, s]), then
        the optimizer step. `step`: the step being trained (1-based), for progress records."""
        raise NotImplementedError

    def forward_only(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> list:
        """One forward of `tokens` [b, s] under the engine's wrappers, no gradients kept. With
        `labels`: [{"lm_loss": mean loss}] where the loss is computed (last stage)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def training_untouched(self, train_mode: bool):
        """For a forward-only pass between training steps (an evaluation loss, a depth map):
        the model in train (top-k routing) or eval (threshold routing) mode, no gradients,
        router statistics from zero for the pass; afterwards training is as it was: mode,
        router statistics, router buffers (loss-free loads) and RNG state restored."""
        from megamor.checkpoint import rng_state, set_rng_state

        stage = self.stage
        saved = [(p.stats, p.token_counts, p.position_counts) for p in stage.parts]
        buffers = [(b, b.clone()) for b in stage.buffers()]
        rng, was_training = rng_state(), self.model.training
        stage.reset_stats()
        self.model.train(train_mode)
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)
            stage.reset_stats()
            for p, (stats, tokens, positions) in zip(stage.parts, saved):
                p.stats, p.token_counts, p.position_counts = stats, tokens, positions
            for b, value in buffers:
                b.copy_(value)
            set_rng_state(rng)

    def batch_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean loss of one batch [b, s] under training-mode routing (top-k), on every rank,
        through `forward_only` (megatron's schedule marks the first micro-batch: a direct call
        of the model would, under Transformer Engine, reuse the FP8 casts of the weights before
        the last optimizer step). Nothing of training changes: no gradients; router statistics,
        router buffers (loss-free loads) and RNG state are restored."""
        import torch.distributed as dist

        dims = self.dims
        with self.training_untouched(train_mode=True):
            out = self.forward_only(tokens, labels)
        loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        if dims.last_stage:
            loss[0] = out[0]["lm_loss"].double()
        dist.all_reduce(loss, group=dims.pp_group)  # from the last stage to every stage
        return float(loss.item())

    # ------------------------------------------------------------------ checkpoint state

    def checkpoint_meta(self) -> dict:
        """The engine's keys of megamor.json (`engine`, and what its own state needs)."""
        return {"engine": self.name}

    def sharded_state_dict(self, is_loading: bool) -> dict:
        raise NotImplementedError

    def save_files(self, directory: Path) -> None:
        """Engine state kept outside the sharded state dict (none by default)."""

    def load(self, path: Path, meta: dict, read_shards: Callable[[dict], dict]) -> None:
        """Restore weights and optimizer state for an exact resume from checkpoint `path`
        (`meta`: its megamor.json, already checked compatible). `read_shards(template)` reads
        the checkpoint's sharded state into a template from `sharded_state_dict(True)`."""
        raise NotImplementedError
