"""Every cross-field rule of a `Config`, checked once at start-up: `validate(cfg, world_size)`
raises `ConfigError` naming the option and what to change."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megamor.errors import InputError

if TYPE_CHECKING:
    from megamor.config.schema import Config, ModelConfig, TrainConfig


class ConfigError(InputError, ValueError):
    """A configuration that cannot run; the message names the option and the fix."""

    kind = "config"


ARCHS = ("vanilla", "recursive", "mor")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("expert_choice", "token_choice")


def _choice(value: str, choices: tuple, option: str) -> None:
    if value not in choices:
        raise ConfigError(f"{option}={value!r} is not one of {', '.join(choices)}")


def _validate_schedule(t: TrainConfig) -> None:
    """Schedule lengths megatron's OptimizerParamScheduler would otherwise reject with a bare
    assertion (warmup must end before train_steps) or run in a way nobody means (a WSD decay
    that starts during warmup)."""
    _choice(t.on_schedule_change, ("error", "replan"), "train.on_schedule_change")
    if t.train_steps < 1:
        raise ConfigError(f"train.train_steps={t.train_steps} must be >= 1")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if t.warmup_steps >= t.train_steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} must be less than train.train_steps="
            f"{t.train_steps} (the schedule needs steps after the warmup); lower "
            f"train.warmup_steps or raise train.train_steps")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in [0, 1]")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.lr_schedule == "wsd" and t.warmup_steps + t.decay_fraction * t.train_steps > t.train_steps:
        raise ConfigError(
            f"train.lr_schedule=wsd: train.warmup_steps={t.warmup_steps} plus the decay "
            f"(train.decay_fraction={t.decay_fraction} x train.train_steps={t.train_steps} = "
            f"{t.decay_fraction * t.train_steps:g} steps) exceed train.train_steps: the decay would "
            f"start during the warmup; lower train.warmup_steps or train.decay_fraction")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, r, p, t = cfg.model, cfg.routing, cfg.parallel, cfg.train
    _choice(m.arch, ARCHS, "model.arch")
    _choice(m.sharing, SHARING, "model.sharing")
    _choice(m.backend, ("auto", "local", "te"), "model.backend")
    _choice(r.type, ROUTERS, "routing.type")
    _choice(r.causal, ("aux_loss", "aux_router"), "routing.causal")
    _choice(r.balancing, ("loss", "loss_free"), "routing.balancing")
    _choice(t.lr_schedule, ("wsd", "cosine", "constant"), "train.lr_schedule")
    _choice(t.precision, ("auto", "fp32", "bf16", "fp8"), "train.precision")
    _choice(t.device, ("auto", "cpu", "cuda"), "train.device")

    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "seq_length", "num_recursions"):
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be >= 1")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.kv_channels or change one of them"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dimension {m.head_dim} must be even for RoPE")

    # Recursion: the unrolled depth must fit N_r and the sharing strategy.
    if m.arch != "vanilla":
        nr = m.num_recursions
        if nr < 2:
            raise ConfigError(f"model.num_recursions={nr}: arch={m.arch} needs at least 2")
        middle = m.sharing.startswith("middle")
        inner = m.num_layers - 2 if middle else m.num_layers
        if inner < nr or inner % nr:
            good = [L for L in range(m.num_layers, m.num_layers + 2 * nr + 1)
                    if (L - 2 if middle else L) % nr == 0 and (L - 2 if middle else L) >= nr]
            what = "num_layers - 2" if middle else "num_layers"
            raise ConfigError(
                f"model.num_layers={m.num_layers} does not fit num_recursions={nr} with "
                f"sharing={m.sharing}: {what} must be a positive multiple of {nr}; "
                f"use model.num_layers={good[0]}"
                + (" (paper: 1 + B x N_r + 1)" if middle else "")
            )
    if m.arch == "mor":
        caps = r.capacities(m.num_recursions)
        if len(caps) != m.num_recursions:
            raise ConfigError(
                f"routing.capacity has {len(caps)} entries; it needs one per recursion step "
                f"(model.num_recursions={m.num_recursions})"
            )
        if any(not (0.0 < c <= 1.0) for c in caps):
            raise ConfigError(f"routing.capacity={caps}: every entry must be in (0, 1]")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(
                f"routing.capacity={caps} increases; hierarchical filtering needs a "
                f"non-increasing schedule (each step chooses among the previous step's tokens)"
            )
        if r.type == "expert_choice" and r.resolved_alpha() <= 0:
            raise ConfigError("routing.alpha must be > 0")
        if m.kv_sharing and caps[0] != 1.0:
            raise ConfigError(
                f"model.kv_sharing needs routing.capacity[0] == 1 (step 1 computes the K/V of "
                f"every token that later steps reuse), got {caps[0]}"
            )
    if m.kv_sharing and m.arch == "vanilla":
        raise ConfigError("model.kv_sharing needs arch=recursive or arch=mor")

    # Parallel layout.
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError("parallel sizes must be >= 1")
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    if m.num_query_groups % tp:
        raise ConfigError(
            f"model.num_query_groups={m.num_query_groups} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    if m.ffn_hidden_size % tp:
        raise ConfigError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}"
        )
    if pp > m.num_layers:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} is larger than the unrolled depth "
            f"model.num_layers={m.num_layers}; every stage needs at least one layer"
        )
    vp = p.virtual_pipeline_size
    if not isinstance(vp, int) or vp < 1:
        raise ConfigError(f"parallel.virtual_pipeline_size={vp!r} must be an integer >= 1")
    if vp > 1 and pp == 1:
        raise ConfigError(f"parallel.virtual_pipeline_size={vp} needs "
                          f"parallel.pipeline_model_parallel_size > 1 (model chunks interleave "
                          f"over pipeline stages); set it to 1")
    if p.pipeline_layers is not None:
        pl = [int(x) for x in p.pipeline_layers]
        if vp == 1 and (len(pl) != pp or sum(pl) != m.num_layers or min(pl) < 1):
            raise ConfigError(
                f"parallel.pipeline_layers={pl} must have {pp} positive entries summing to "
                f"model.num_layers={m.num_layers}"
            )
        if vp > 1 and (len(pl) != pp * vp or sum(pl) != m.num_layers or min(pl) < 0
                       or pl[0] < 1 or pl[-1] < 1):
            raise ConfigError(
                f"parallel.pipeline_layers={pl} must have pipeline_model_parallel_size x "
                f"virtual_pipeline_size = {pp * vp} entries (one per model chunk, in execution "
                f"order) summing to model.num_layers={m.num_layers}; a middle chunk may be 0, "
                f"the first and the last need a layer")
    if m.kv_sharing and pp > 1:
        raise ConfigError(
            "model.kv_sharing with parallel.pipeline_model_parallel_size > 1 is not supported: "
            "step 1's K/V would have to cross stages; use pipeline_model_parallel_size=1"
        )
    if p.sequence_parallel:
        _validate_sequence_parallel(m, t, tp)
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs "
                          "parallel.use_distributed_optimizer=true (without it every rank keeps "
                          "all parameters and there is nothing to gather)")
    _validate_engine(cfg)
    if world_size is not None:
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel = "
                f"{tp} x {pp}; change the number of processes or the layout"
            )
        dp = world_size // (tp * pp)
        if p.data_parallel_size is not None and p.data_parallel_size != dp:
            raise ConfigError(
                f"parallel.data_parallel_size={p.data_parallel_size} but world size {world_size}"
                f" / (tp {tp} x pp {pp}) = {dp}"
            )
        p.data_parallel_size = dp
    dp = p.data_parallel_size or 1

    # Batch arithmetic.
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size x data_parallel_size = {t.micro_batch_size} x {dp}"
        )
    if p.virtual_pipeline_size > 1:
        m_count = t.global_batch_size // (t.micro_batch_size * dp)
        if m_count % pp:
            raise ConfigError(
                f"parallel.virtual_pipeline_size={p.virtual_pipeline_size} needs a number of "
                f"micro-batches per step that is a multiple of "
                f"pipeline_model_parallel_size={pp} (megatron's interleaved schedule runs them "
                f"in groups of pp); train.global_batch_size={t.global_batch_size} / "
                f"(micro_batch_size {t.micro_batch_size} x data parallel {dp}) = {m_count}")
    _validate_schedule(t)
    _validate_kernels(m, t)
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr")
    _choice(cfg.data.on_corrupt, ("error", "skip"), "data.on_corrupt")
    if cfg.data.prefetch_steps < 0:
        raise ConfigError(f"data.prefetch_steps={cfg.data.prefetch_steps} must be >= 0 "
                          f"(0: read on the training thread)")
    _choice(t.on_nonfinite, ("skip", "error"), "train.on_nonfinite")
    if t.max_nonfinite_in_row < 1:
        raise ConfigError(f"train.max_nonfinite_in_row={t.max_nonfinite_in_row} must be >= 1")
    if cfg.tracking.loss_spike_factor != 0 and not cfg.tracking.loss_spike_factor > 1:
        raise ConfigError(f"tracking.loss_spike_factor={cfg.tracking.loss_spike_factor} must be "
                          f"> 1 (0: off)")
    if cfg.data.path is None:
        raise ConfigError(
            "data.path is not set (a config written by `megamor convert from-hf` leaves it to "
            "you): tokenize data with the model's tokenizer (`megamor data prepare INPUTS --out "
            "DIR --seq-length N --tokenizer CHECKPOINT/tokenizer`) and set data.path=DIR")
    if cfg.data.path != "builtin":
        from megamor.data.spec import parse_data_spec
        try:
            parse_data_spec(cfg.data.path)
        except ValueError as e:
            raise ConfigError(f"data.path={cfg.data.path!r}: {e}") from None
    c = cfg.checkpoint
    for name in ("save_interval", "keep_last", "keep_every"):
        if getattr(c, name) < 0:
            raise ConfigError(f"checkpoint.{name}={getattr(c, name)} must be >= 0")
    if c.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1 (the newest checkpoint is always kept)")
    if c.new_lineage and c.resume is not None:
        raise ConfigError(
            f"checkpoint.new_lineage=true starts a new run; it cannot be combined with "
            f"checkpoint.resume={c.resume} (--resume): drop one of them")
    if cfg.tracking.depth_map_interval is not None and cfg.tracking.depth_map_interval < 0:
        raise ConfigError(f"tracking.depth_map_interval={cfg.tracking.depth_map_interval} must be "
                          f">= 0 (0: off; unset: with every checkpoint save)")
    if not math.isfinite(t.clip_grad) or t.clip_grad < 0:
        raise ConfigError(f"train.clip_grad={t.clip_grad} must be >= 0 (0 disables clipping)")
    _validate_watchdog(cfg)


def _validate_watchdog(cfg: Config) -> None:
    h, tr = cfg.run.hang_timeout, cfg.tracking
    if h is not None and (not math.isfinite(h) or h < 0 or 0 < h < 5):
        raise ConfigError(
            f"run.hang_timeout={h}: give seconds >= 5 (a step must fit in it), 0 to turn the hang "
            f"watchdog off, or leave it unset for 10 x the median step (at least 5 minutes)")
    if not math.isfinite(tr.straggler_threshold) or tr.straggler_threshold <= 1.0:
        raise ConfigError(f"tracking.straggler_threshold={tr.straggler_threshold} must be > 1 "
                          f"(a ratio to the median rank's compute time, e.g. 1.2)")
    if tr.straggler_windows < 1:
        raise ConfigError(f"tracking.straggler_windows={tr.straggler_windows} must be >= 1")


def _validate_engine(cfg: Config) -> None:
    """What the DeepSpeed engine does not do, named by the option to change."""
    p, t, c = cfg.parallel, cfg.train, cfg.checkpoint
    _choice(p.engine, ("megatron", "deepspeed"), "parallel.engine")
    _choice(p.offload_optimizer, ("none", "cpu"), "parallel.offload_optimizer")
    _choice(p.offload_params, ("none", "cpu"), "parallel.offload_params")
    _choice(p.zero3_shared_block, ("once", "deepspeed"), "parallel.zero3_shared_block")
    if p.engine != "deepspeed":
        changed = [f"parallel.{k}" for k, default in (
            ("offload_optimizer", "none"), ("offload_params", "none"), ("deepspeed_config", None))
            if getattr(p, k) != default]
        if changed:
            raise ConfigError(f"{', '.join(changed)} only apply to parallel.engine=deepspeed "
                              f"(the engine is {p.engine})")
        return
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not one of 1, 2, 3")
    if p.pipeline_model_parallel_size != 1:
        raise ConfigError(
            f"parallel.engine=deepspeed runs without pipeline parallelism: set "
            f"parallel.pipeline_model_parallel_size=1 (is {p.pipeline_model_parallel_size}) or "
            f"use parallel.engine=megatron")
    if p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel needs parallel.engine=megatron (DeepSpeed "
                          "does not reduce the sequence-parallel norm gradients)")
    if p.overlap_grad_reduce or p.overlap_param_gather:
        raise ConfigError("parallel.overlap_grad_reduce / parallel.overlap_param_gather apply to "
                          "parallel.engine=megatron; DeepSpeed's own overlap is overlap_comm "
                          "(set it in parallel.deepspeed_config)")
    if p.offload_params != "none" and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params={p.offload_params} needs "
                          f"parallel.zero_stage=3 (is {p.zero_stage})")
    if t.precision == "fp8":
        raise ConfigError("train.precision=fp8 needs parallel.engine=megatron (Transformer "
                          "Engine's FP8 is wired into megatron's engine only); use bf16")
    if c.async_save:
        raise ConfigError("checkpoint.async_save=true needs parallel.engine=megatron (DeepSpeed "
                          "saves its engine state synchronously); set it to false")
    if p.deepspeed_config is not None and not Path(p.deepspeed_config).is_file():
        raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config}: no such file")


def _validate_sequence_parallel(m: ModelConfig, t: TrainConfig, tp: int) -> None:
    """Every tensor-parallel rank holds seq_length / tp positions between layers (megatron's
    sequence-parallel layout); under FP8 each rank's rows of a full-length layer are FP8 GEMM
    rows (Transformer Engine casts them before its all-gather)."""
    if tp == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    if m.seq_length % tp:
        raise ConfigError(
            f"parallel.sequence_parallel: model.seq_length={m.seq_length} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp} (each rank holds an equal slice)")
    rows = m.seq_length // tp * t.micro_batch_size
    if t.precision == "fp8" and rows % 16:
        raise ConfigError(
            f"train.precision=fp8 with parallel.sequence_parallel: model.seq_length / "
            f"tensor_model_parallel_size x train.micro_batch_size = {rows} tokens per rank of a "
            f"full-length GEMM must be a multiple of 16 (FP8 GEMMs); change either")


def _validate_kernels(m: ModelConfig, t: TrainConfig) -> None:
    """Recompute, attention layout and FP8 options."""
    _choice(m.recompute, ("none", "selective", "full"), "model.recompute")
    _choice(m.recompute_unit, ("layer", "step"), "model.recompute_unit")
    _choice(m.varlen_attention, ("auto", "packed", "padded"), "model.varlen_attention")
    _choice(t.fp8_recipe, ("tensorwise", "delayed", "mxfp8", "blockwise"), "train.fp8_recipe")
    _choice(t.fp8_format, ("hybrid", "e4m3"), "train.fp8_format")
    _choice(t.fp8_amax_compute_algo, ("max", "most_recent"), "train.fp8_amax_compute_algo")
    if m.token_pad_multiple is not None and m.token_pad_multiple < 1:
        raise ConfigError(f"model.token_pad_multiple={m.token_pad_multiple} must be >= 1")
    if m.recompute == "full" and m.kv_sharing:
        raise ConfigError(
            "model.recompute=full does not work with model.kv_sharing=true (later steps read "
            "step 1's keys, which a recomputed step 1 would not give gradients to); use "
            "model.recompute=selective")
    if t.precision == "fp8":
        if t.fp8_bf16_layers < 0 or 2 * t.fp8_bf16_layers >= m.num_layers:
            raise ConfigError(
                f"train.fp8_bf16_layers={t.fp8_bf16_layers}: keep fewer than half of "
                f"model.num_layers={m.num_layers} layers in bf16 at each end")
        rows = m.seq_length * t.micro_batch_size
        if rows % 16:
            raise ConfigError(
                f"train.precision=fp8: model.seq_length x train.micro_batch_size = {rows} tokens "
                f"per full-length GEMM must be a multiple of 16 (FP8 GEMMs); change either")
        if t.fp8_bf16_layers and t.fp8_recipe == "delayed":
            raise ConfigError(
                "train.fp8_recipe=delayed cannot keep layers in bf16 (megatron refuses it): set "
                "train.fp8_bf16_layers=0 or use train.fp8_recipe=tensorwise")
