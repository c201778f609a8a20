"""The configuration's schema: one typed dataclass per section, `Config` holding them. Field
comments are the reference (docs/configuration.md renders the same); rules across fields live in
megamor/config/validation.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

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
    # Model chunks per pipeline stage (megatron's interleaved 1F1B schedule): the unrolled
    # network is cut into pipeline_model_parallel_size x virtual_pipeline_size pieces, piece j
    # on stage j mod pp as its chunk j // pp. Shrinks the fill/drain bubble and balances stages
    # that a contiguous cut cannot (docs/architecture.md, "Virtual pipeline").
    virtual_pipeline_size: int = 1
    # Unrolled layers per stage (pp entries), or per piece in execution order (pp x
    # virtual_pipeline_size entries, a middle piece may be 0); default: cost-balanced
    pipeline_layers: Optional[list] = None
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
        from megamor.config.validation import validate
        validate(self, world_size)
        return self

