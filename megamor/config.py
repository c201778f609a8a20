"""Typed run configuration: dataclasses loaded from YAML, overridable from the command line.

One place for every option a run has. `load_config(path, overrides)` builds a `Config` from an
optional YAML file, a model preset and `section.field=value` overrides, then `validate()` checks
every cross-field rule once, at start-up, raising `ConfigError` with a message that names the
option and says what to change. The resolved config is saved next to every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megamor.errors import InputError
from megamor.presets import MODEL_PRESETS, PRESET_TRAIN


class ConfigError(InputError, ValueError):
    """A configuration that cannot run; the message names the option and the fix."""

    kind = "config"


ARCHS = ("vanilla", "recursive", "mor")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("expert_choice", "token_choice")


@dataclass
class ModelConfig:
    """Shape of the network. `num_layers` is the unrolled depth L (prelude + N_r x B + coda)."""

    preset: Optional[str] = None
    arch: str = "mor"  # vanilla | recursive | mor
    num_layers: int = 8
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 176
    kv_channels: Optional[int] = None  # head dim; default hidden_size / heads
    vocab_size: Optional[int] = None  # default: the tokenizer's
    make_vocab_size_divisible_by: int = 64
    seq_length: int = 128
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    num_recursions: int = 3
    sharing: str = "middle_cycle"
    kv_sharing: bool = False  # recursive KV sharing: later steps reuse step 1's K/V
    backend: str = "auto"  # auto | local | te   (te = Transformer Engine, GPU only)
    # Activation recomputation: none | selective (core attention, megatron's) | full (every
    # layer's activations recomputed in backward), per `recompute_unit`: layer | step (the layers
    # of one recursion step as one unit: fewer saved inputs, more recompute).
    recompute: str = "none"
    recompute_unit: str = "layer"
    # Token sets of variable length per sequence (token-choice, threshold routing at eval):
    # auto (THD-packed under Transformer Engine, padded on the local backend) | packed | padded.
    varlen_attention: str = "auto"
    # Rows of every gathered set padded to a multiple of this (default: 16 under FP8, 32 under
    # MXFP8, else 1); padding rows are never attended to by real tokens, counted or scattered.
    token_pad_multiple: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class RoutingConfig:
    """MoR routers (MOR_SPEC.md sections 3 and 4). Ignored unless model.arch == 'mor'."""

    type: str = "expert_choice"  # expert_choice | token_choice
    alpha: Optional[float] = None  # gate scale; default 0.1 (expert) / 1.0 (token)
    capacity: Optional[list] = None  # per step; default (N_r - r + 1) / N_r
    causal: str = "aux_loss"  # aux_loss | aux_router  (how expert-choice routes at inference)
    aux_loss_weight: float = 0.001
    balancing: str = "loss"  # loss | loss_free  (token-choice)
    balance_loss_weight: float = 0.1
    z_loss_weight: float = 0.0
    bias_update_rate: float = 0.001
    gate_every_step: bool = False  # token-choice: gate intermediate steps too (paper's equation)

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.type == "expert_choice" else 1.0

    def capacities(self, num_recursions: int) -> list[float]:
        if self.capacity is not None:
            return [float(c) for c in self.capacity]
        return [(num_recursions - r) / num_recursions for r in range(num_recursions)]


@dataclass
class ParallelConfig:
    """Parallel layout. data_parallel_size is world_size / (tp * pp) unless given."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # megatron engine: the data-parallel gradient reduction runs during the backward, bucket by
    # bucket (overlap_grad_reduce), and the distributed optimizer's parameter all-gather during
    # the next forward (overlap_param_gather). null: on when the device is a GPU.
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    pipeline_layers: Optional[list] = None  # unrolled layers per stage; default: cost-balanced
    # Training engine: megatron (DDP + distributed optimizer, TP/PP/DP) | deepspeed (ZeRO over
    # data parallel, TP through megatron's groups, no PP). docs/engines.md compares them.
    engine: str = "megatron"
    zero_stage: int = 2  # deepspeed: 1 (optimizer state) | 2 (+ gradients) | 3 (+ parameters)
    offload_optimizer: str = "none"  # deepspeed: none | cpu (optimizer state and step on the CPU)
    offload_params: str = "none"  # deepspeed, ZeRO-3: none | cpu
    # deepspeed, ZeRO-3: gather the shared recursion block once per forward and once per
    # backward, held over the recursion loop (once), or leave it to DeepSpeed's per-module
    # fetch and release (deepspeed: up to N_r gathers each way, see docs/engines.md)
    zero3_shared_block: str = "once"
    # deepspeed: a JSON file whose keys override the generated DeepSpeed config (each logged)
    deepspeed_config: Optional[str] = None


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 4
    global_batch_size: int = 16
    train_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 0.0
    lr_schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: last fraction of steps decays linearly to min_lr
    # Resume with schedule options that change the LR of steps already trained (megamor/schedule.py):
    # error (refuse, saying how) | replan (follow the new schedule from the current step on)
    on_schedule_change: str = "error"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp8   (auto: bf16 on GPU, fp32 on CPU)
    # FP8 (precision=fp8, Transformer Engine): recipe tensorwise (current scaling: the shared
    # block's per-step statistics never mix) | delayed | mxfp8 (Blackwell) | blockwise.
    fp8_recipe: str = "tensorwise"
    fp8_format: str = "hybrid"  # hybrid (E4M3 forward, E5M2 gradients) | e4m3
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024  # delayed scaling only
    fp8_amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    fp8_bf16_layers: int = 1  # first and last unrolled layers kept in bf16 (0: none)
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 10
    # A step whose loss or gradient norm is not finite: skip (its update is not applied and it is
    # counted; the run stops after `max_nonfinite_in_row` such steps in a row) | error (stop)
    on_nonfinite: str = "skip"
    max_nonfinite_in_row: int = 5


@dataclass
class DataConfig:
    # prepared shards directory, or 'builtin' (CPython's own docs); null: not chosen yet (the
    # config of `megamor convert from-hf`), which a run refuses, saying how to set it
    path: Optional[str] = "builtin"
    builtin_root: str = "~/.cache/megamor/builtin"
    tokenizer: Optional[str] = None  # tokenizer dir/file; default: the dataset's
    tokenizer_vocab_size: int = 1024  # used when training the builtin tokenizer
    seed: int = 1234
    on_corrupt: str = "error"  # error | skip (skip a corrupt shard, loudly, and count it)
    # Steps whose micro-batches a background thread reads ahead of the step that trains
    # (megamor.data.BatchLoader); 0: read on the training thread at the start of each step
    prefetch_steps: int = 2


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (megatron dist_checkpointing, torch_dist format)."""

    dir: Optional[str] = None  # default: <run.output_dir>/checkpoints
    save_interval: int = 0  # steps between saves; 0: only at the end and on a signal
    keep_last: int = 2  # newest checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    async_save: bool = False  # write in the background while training continues
    resume: Optional[str] = None  # None | auto | a checkpoint directory
    # Start from these model weights (fresh optimizer, step 0) unless `resume` finds a checkpoint:
    # a weights-only checkpoint (`megamor convert from-hf`) or any training checkpoint.
    init_from: Optional[str] = None
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 / SIGINT: finish the step, save, exit 75
    # Start a new run in a checkpoint directory that holds another run's checkpoints (they are
    # moved, intact, to <dir>/previous/<time>/); without it such a start is refused.
    new_lineage: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking from rank 0; failures never stop training (docs/tracking.md)."""

    enabled: bool = True
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else SQLite in the run dir
    experiment: str = "megamor"
    run_name: Optional[str] = None
    peak_flops: Optional[float] = None  # per device, for MFU; default: GPU datasheet / CPU measured
    # Depth maps of a fixed sample logged during training (arch=mor): steps between maps;
    # default (None): with every checkpoint save and at the last step; 0: off.
    depth_map_interval: Optional[int] = None
    depth_map_text: Optional[str] = None  # the sample; default: the first training sequence
    # Straggler report (megamor/stragglers.py): warn when one rank computes at least this many
    # times the median rank's time for this many logging windows in a row.
    straggler_threshold: float = 1.2
    straggler_windows: int = 3
    # Report a step whose loss exceeds this multiple of its running average (log line, MLflow
    # metric `loss_spike` and tag); 0: off
    loss_spike_factor: float = 2.0


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    # Hang watchdog (megamor/watchdog.py): seconds without any rank advancing before the job is
    # ended with its stacks and exit 76; unset (null): 10 x the median step, at least 5 minutes;
    # 0: off. The collective (gloo/NCCL) timeouts derive from it and sit above it.
    hang_timeout: Optional[float] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world_size: Optional[int] = None) -> "Config":
        validate(self, world_size)
        return self


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    return value


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(section_obj: Any, values: dict, where: str) -> None:
    hints = _section_types(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{where}: unknown option '{key}' (known: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    sections = _section_types(Config)
    # A model preset fills the model section first; explicit keys then override it.
    model_values = dict(data.get("model") or {})
    preset = model_values.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"{source}: model.preset={preset!r} is unknown; choose one of "
                f"{', '.join(MODEL_PRESETS)}"
            )
        _apply(cfg.model, MODEL_PRESETS[preset], f"{source}: preset {preset}")
        _apply(cfg.train, PRESET_TRAIN.get(preset, {}), f"{source}: preset {preset}")
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section '{name}' (known: {', '.join(sections)})"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        _apply(getattr(cfg, name), values, f"{source}: {name}")
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(
            f"override {text!r} must look like section.option=value, e.g. model.hidden_size=128"
        )
    key, raw = text.split("=", 1)
    section, option = key.strip().split(".", 1)
    return section, option, yaml.safe_load(raw) if raw != "" else ""


def check_override(text: str) -> tuple[str, str, Any]:
    """One `section.option=value` from the command line: its section, option and (coerced)
    value, or a ConfigError that names the override itself."""
    section, option, value = parse_override(text)
    sections = _section_types(Config)
    if section not in sections:
        raise ConfigError(f"{text}: unknown section '{section}' (known: {', '.join(sections)})")
    hints = _section_types(sections[section])
    if option not in hints:
        raise ConfigError(f"{text}: unknown option '{option}' in section {section} (known: "
                          f"{', '.join(sorted(hints))})")
    value = _coerce(value, hints[option], f"{section}.{option}")
    if (section, option) == ("model", "preset") and value is not None \
            and value not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={value!r} is unknown; choose one of "
                          f"{', '.join(MODEL_PRESETS)}")
    return section, option, value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file (optional) -> preset -> overrides, in that order of precedence (last wins).
    Errors name the file, or the override they come from."""
    data: dict = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    for text in overrides or []:
        section, option, value = check_override(text)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][option] = value
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- validation


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
    if p.pipeline_layers is not None:
        pl = [int(x) for x in p.pipeline_layers]
        if len(pl) != pp or sum(pl) != m.num_layers or min(pl) < 1:
            raise ConfigError(
                f"parallel.pipeline_layers={pl} must have {pp} positive entries summing to "
                f"model.num_layers={m.num_layers}"
            )
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
