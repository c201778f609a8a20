"""The DeepSpeed engine (`parallel.engine=deepspeed`): megamor's MoR model, data, logging,
tracking, signals and checkpoints, trained under DeepSpeed's ZeRO-1/2/3 instead of megatron's DDP
and distributed optimizer.

What stays megamor's: the model stage (built from the same spec, same seeded init), the data order
(GlobalBatchSampler), router statistics, the log line and MLflow, the LR schedule (megatron's
OptimizerParamScheduler driving the optimizer's parameter groups, with megatron's weight-decay
groups), and the checkpoint directory: `step_N/` holds the model weights as megatron
dist_checkpointing shards, readable by `megamor convert`, `eval`, `depth-map` and
`checkpoint.init_from` as from the megatron engine, plus `step_N/deepspeed/`, DeepSpeed's own
engine state (ZeRO-partitioned optimizer state) for an exact resume with this engine.

The DeepSpeed config is generated from megamor's (`deepspeed_config`), one source of truth; a
`parallel.deepspeed_config` JSON may override keys, and every overridden key is logged.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from megamor.checkpoint import CheckpointError, read_meta, check_model_shape, check_resumable
from megamor.config import Config, ConfigError
from megamor.trainer import Trainer

ENGINE_STATE = "deepspeed"  # subdirectory of a checkpoint holding DeepSpeed's engine state
ENGINE_TAG = "state"


# ----------------------------------------------------------------------------- configuration


def optimizer_section(cfg: Config, device_type: str) -> dict:
    """AdamW with megamor's hyper-parameters. Which implementation DeepSpeed builds:
    - on the CPU, and on GPUs without offload: torch's AdamW (`torch_adam`), as the megatron
      engine uses when apex is absent; no JIT-compiled extension is needed;
    - optimizer offload on GPUs: DeepSpeed's CPUAdam (DeepSpeed requires its own CPU optimizer
      there; it compiles the cpu_adam extension on first use).
    The learning rate and weight decay set here are overwritten per group, every step, by the
    LR schedule (`OptimizerParamScheduler`)."""
    t, p = cfg.train, cfg.parallel
    params = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
              "weight_decay": t.weight_decay}
    offload_on_gpu = p.offload_optimizer != "none" and device_type == "cuda"
    if not offload_on_gpu:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def deepspeed_config(cfg: Config, dp: int, num_microbatches: int, device_type: str,
                     bf16: bool) -> dict:
    """DeepSpeed's config from megamor's: batch, accumulation, clipping, precision, ZeRO stage and
    offload. `dp`: data-parallel size; DeepSpeed checks micro x accumulation x dp = global."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": p.offload_optimizer, "pin_memory": device_type == "cuda"}
    if p.offload_params != "none":
        zero["offload_param"] = {"device": p.offload_params, "pin_memory": device_type == "cuda"}
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": num_microbatches,
        "gradient_clipping": t.clip_grad,
        "optimizer": optimizer_section(cfg, device_type),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # megamor prints its own line
        "wall_clock_breakdown": False,
    }
    if p.offload_optimizer != "none" and device_type != "cuda":
        # On a CPU-only machine the "offloaded" optimizer is torch's AdamW, already on the CPU.
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def apply_overrides(generated: dict, path: Optional[str]) -> tuple[dict, list[str]]:
    """`parallel.deepspeed_config`: a JSON file whose keys replace the generated ones (nested
    sections merged key by key). Returns the config and one line per overridden key."""
    if path is None:
        return generated, []
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config={path}: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={path}: the top level must be an object")
    lines: list[str] = []

    def merge(base: dict, new: dict, prefix: str) -> dict:
        out = dict(base)
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                out[k] = merge(base[k], v, f"{prefix}{k}.")
            else:
                if base.get(k, object()) != v:
                    lines.append(f"{prefix}{k}: {base.get(k, '(unset)')!r} -> {v!r}")
                out[k] = v
        return out

    return merge(generated, user, ""), lines


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """megatron's weight-decay groups: no decay for biases and 1-D parameters (norms), decay for
    the rest; `wd_mult` / `max_lr` / `min_lr` as megatron's OptimizerParamScheduler reads them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (no_decay if len(shape) == 1 or name.endswith(".bias") else decay).append(p)
    t = cfg.train
    base = {"lr_mult": 1.0, "max_lr": t.lr, "min_lr": t.min_lr}
    return [g for g in ({"params": decay, "wd_mult": 1.0, **base},
                        {"params": no_decay, "wd_mult": 0.0, **base}) if g["params"]]


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron's parallel state: tensor parallel is DeepSpeed's
    model parallel; ZeRO shards over megatron's data-parallel group."""

    def __init__(self):
        from megatron.core import parallel_state as mps
        self.mps = mps

    def get_model_parallel_rank(self):
        return self.mps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.mps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.mps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self.mps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.mps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.mps.get_data_parallel_group()


def load_engine_file(path: str, map_location=None):
    """One file of DeepSpeed's engine state, without unpickling arbitrary objects: torch's
    `weights_only` loader, allowing only the three plain DeepSpeed classes its ZeRO files hold
    (the ZeRO stage enum, the loss-scaler record, fragment addresses). Replaces DeepSpeed's own
    loader, which unpickles everything."""
    import pickle
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not loaded: it holds objects other than tensors and "
                              f"DeepSpeed's plain state records ({first[:200]})") from None


# ----------------------------------------------------------------------------- ZeRO-3 residency


_HELD = -1  # a sub-module id no DeepSpeed module has: a held parameter is never released


class _OnBackward(torch.autograd.Function):
    """Identity whose backward calls `fn` first (before the gradient flows on)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


class SharedBlockResidency:
    """ZeRO-3: the shared recursion block's parameters gathered once per forward and once per
    backward, not at every use.

    DeepSpeed gathers a module's partitioned parameters before each call and releases them
    after; a block looped N_r times is gathered N_r times in the forward and N_r times again in
    the backward. `enter` (before the first recursion step) gathers the block with one coalesced
    all-gather and holds it; `exit` (after the last step) releases it. Their autograd twins do
    the same in reverse: the backward reaches `exit` first (gather, hold) and `enter` last
    (release). While held, every parameter carries a sub-module id no module has, so DeepSpeed's
    own release after each layer call leaves it gathered."""

    def __init__(self, params: list):
        # Parameters DeepSpeed keeps gathered anyway (below stage3_param_persistence_threshold)
        # are left to it.
        self.params = [p for p in params if not p.ds_persist]
        self.gathers = 0  # coalesced all-gathers issued (for tests and benchmarks)

    def hold(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        need = [p for p in self.params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if need:
            need[0].all_gather(param_list=need)
            self.gathers += 1
        for p in self.params:
            p.ds_active_sub_modules.add(_HELD)

    def release(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        for p in self.params:
            p.ds_active_sub_modules.discard(_HELD)
        free = [p for p in self.params
                if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if free:
            free[0].partition(param_list=free)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        self.hold()
        return _OnBackward.apply(x, self.release) if x.requires_grad else x

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        self.release()
        return _OnBackward.apply(x, self.hold) if x.requires_grad else x


class AllGatherMeter:
    """Bytes DeepSpeed all-gathers (ZeRO-3 parameter fetches), counted at deepspeed.comm's two
    all-gather entry points; `take()` returns the count since the last take. The wrappers are
    installed once per process (a later trainer in the same process reuses them)."""

    _bytes = 0
    _installed = False

    def __init__(self):
        cls = type(self)
        if not cls._installed:
            import deepspeed.comm as dcomm
            for name in ("allgather_fn", "all_gather_into_tensor"):
                setattr(dcomm, name, cls._counting(getattr(dcomm, name)))
            cls._installed = True
        self.take()

    @classmethod
    def _counting(cls, fn):
        def wrapper(*args, **kwargs):
            out = args[0] if args else kwargs.get("output_tensor")
            if out is not None:
                cls._bytes += out.numel() * out.element_size()
            return fn(*args, **kwargs)
        return wrapper

    @classmethod
    def take(cls) -> int:
        n, cls._bytes = cls._bytes, 0
        return n


class ParamGatherMeter:
    """Bytes of the given ZeRO-3 parameters gathered (their full size, each time a gather
    includes them), whichever path gathers them: DeepSpeed's module fetches
    (`all_gather_coalesced`) or a `SharedBlockResidency` (`all_gather`). Wraps the per-parameter
    methods DeepSpeed attaches; `take()` returns the count since the last take."""

    def __init__(self, params: list):
        self._bytes = 0
        ids = {id(p) for p in params}
        for p in params:
            for name in ("all_gather_coalesced", "all_gather"):
                setattr(p, name, self._counting(getattr(p, name), ids))

    def _counting(self, fn, ids: set):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        def wrapper(*args, **kwargs):
            group = args[0] if args else kwargs.get("params", kwargs.get("param_list"))
            for q in group or ():
                if id(q) in ids and q.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    self._bytes += q.ds_numel * q.ds_tensor.element_size()
            return fn(*args, **kwargs)
        return wrapper

    def take(self) -> int:
        n, self._bytes = self._bytes, 0
        return n


def shared_block_params(stage) -> list:
    """Parameters of the unique layers that run at recursion steps (step > 0)."""
    looped = {l.unique for l in stage.plan.layers[stage.start:stage.stop] if l.step > 0}
    return [p for u in sorted(looped) for p in stage.layers[str(u)].parameters()]


# ----------------------------------------------------------------------------- trainer


def _prepare_deepspeed(device: torch.device) -> None:
    """DeepSpeed's INFO logging off (megamor prints its own lines). On the CPU, DeepSpeed's
    shared-memory all-reduce kernel is not built: it serves only DeepSpeed's inference
    all-reduce, and its JIT build would need a C++ compiler on every machine that trains."""
    # Named, not detected: DeepSpeed's detection prints a warning on every CPU rank.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
    import deepspeed.ops
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedTrainer(Trainer):
    engine = "deepspeed"
    measures_collective_wait = False  # its collectives run inside backward() and step()

    def _build_model(self) -> None:
        """The stage only; the DeepSpeed engine is created in `_restore`, after
        `checkpoint.init_from` weights (if any) are in the plain module, which ZeRO then
        partitions."""
        from megamor import parallel
        from megamor.model import build_stage, plan_for, transformer_config
        cfg, dims = self.cfg, self.dims
        self.tcfg = transformer_config(cfg, self.dtype, self.fp8, device_type=self.device.type)
        self.plan, self.ranges = plan_for(cfg, self.vocab_size)
        self.stage = build_stage(cfg, self.tcfg, self.vocab_size, dims.pp_rank, cfg.train.seed,
                                 dp_group=dims.dp_group)
        self.stage.to(self.device)
        parallel.create_shared_layer_groups(dims, self.plan, self.ranges, self.stage)
        self.model, self.optimizer, self.residency = self.stage, None, None
        self.allgather_meter: Optional[AllGatherMeter] = None
        self.shared_meter: Optional[ParamGatherMeter] = None
        self.schedule_note: Optional[str] = None

    def reload_weights(self) -> None:
        pass  # init_from loads into the plain module, before the engine copies its weights

    def _restore(self) -> None:
        if self.resumed_from is None and self.cfg.checkpoint.init_from:
            self.initialised_from = self.checkpointer.load_weights(self, self.cfg.checkpoint.init_from)
        self._create_engine()
        if self.resumed_from is not None:
            self._load(self.resumed_from)

    def _create_engine(self) -> None:
        _prepare_deepspeed(self.device)
        import deepspeed
        from megamor.schedule import build_scheduler

        cfg, dims = self.cfg, self.dims
        t = cfg.train
        generated = deepspeed_config(cfg, dims.dp, self.num_microbatches, self.device.type,
                                     self.dtype == torch.bfloat16)
        self.ds_config, overridden = apply_overrides(generated, cfg.parallel.deepspeed_config)
        if dims.rank == 0:
            for line in overridden:
                print(f"deepspeed config: {cfg.parallel.deepspeed_config} overrides {line}",
                      flush=True)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=self.stage, model_parameters=param_groups(self.stage, cfg),
            config=self.ds_config, mpu=MegatronMPU() if dims.tp > 1 else None,
            dist_init_required=False)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        if self.zero_stage == 3:
            from deepspeed.runtime.zero import register_external_parameter
            if self.stage.pre_process and self.stage.post_process:
                # The output layer multiplies by the embedding's (tied) weight.
                register_external_parameter(self.stage.output_layer,
                                            self.stage.shared_embedding_or_output_weight())
            if cfg.parallel.zero3_shared_block == "once" and self.stage._loop_span:
                self.residency = SharedBlockResidency(shared_block_params(self.stage))
                self.stage.recursion_scope = self.residency
            self.allgather_meter = AllGatherMeter()
            if self.stage._loop_span:
                self.shared_meter = ParamGatherMeter(shared_block_params(self.stage))
        self.scheduler = build_scheduler(self.optimizer, t)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        import time

        cfg = self.cfg
        t0 = time.perf_counter()
        self.progress.enter("data", self.step + 1)
        micro = self.batches.get(self.step)
        self.stage.aux_loss_scale = 1.0 / self.num_microbatches
        self.stage.reset_stats()
        self.model.train()
        for meter in (self.allgather_meter, self.shared_meter):
            if meter is not None:
                meter.take()  # not counting a depth map's forward since the last step
        losses = []
        shared = {"forward": 0, "backward": 0}
        self.progress.enter("forward_backward", self.step + 1)  # and the ZeRO collectives
        for batch in micro:
            per_token = self.model(input_ids=batch["tokens"].to(self.device),
                                   labels=batch["labels"].to(self.device))
            loss = per_token.float().mean()
            if self.shared_meter is not None:
                shared["forward"] += self.shared_meter.take()
            self.model.backward(loss)  # scaled by 1 / accumulation steps, as megatron's schedule
            if self.shared_meter is not None:
                shared["backward"] += self.shared_meter.take()
            self.model.step()  # an optimizer step at the accumulation boundary only
            losses.append({"lm_loss": loss.detach()})
        grad_norm = self.model.get_global_grad_norm()
        # DeepSpeed's ZeRO optimizers (>= 0.19.8, every stage, fp32 and bf16) skip the update of
        # a step whose global gradient norm is not finite; megamor counts it (step_health.py).
        skipped = not self.model.was_step_applied()
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
        if self.allgather_meter is not None:  # this rank's ZeRO-3 parameter all-gathers
            metrics["zero3/allgather_bytes"] = self.allgather_meter.take()
        if self.shared_meter is not None:  # of which the shared recursion block's weights
            for k, v in shared.items():
                metrics[f"zero3/shared_block_{k}_bytes"] = v
        self.history.append(metrics)
        return metrics

    def _forward_only(self, tokens: torch.Tensor) -> None:
        self.model(input_ids=tokens)

    # ------------------------------------------------------------------ checkpoints

    def sharded_state_dict(self, is_loading: bool) -> dict:
        """The model weights, as the megatron engine writes them (readable by every tool). Under
        ZeRO-3 the partitioned parameters are gathered for the snapshot, copied to the host."""
        if self.zero_stage != 3:
            return {"model": self.stage.sharded_state_dict()}
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
        from deepspeed.runtime.zero import GatheredParameters
        with GatheredParameters(list(self.stage.parameters()), modifier_rank=None):
            state = self.stage.sharded_state_dict()
            for sh in nested_values(state):
                # Factories (the fused SwiGLU fc1, split at save time) hold the tensor too.
                if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                    sh.data = sh.data.detach().to("cpu", copy=True)
        return {"model": state}

    def save_engine_state(self, directory: Path) -> None:
        """DeepSpeed's engine state (each rank its ZeRO partition of the optimizer state)."""
        self.model.save_checkpoint(str(directory / ENGINE_STATE), tag=ENGINE_TAG,
                                   save_latest=False)

    def _load(self, path: Path) -> None:
        """Exact resume: DeepSpeed restores module weights and ZeRO-partitioned optimizer state
        from `<checkpoint>/deepspeed`, megamor the schedule, data position and RNG."""
        meta = read_meta(path)
        check_resumable(meta, path, self.engine)
        check_model_shape(meta, self.cfg.model, path)
        if not self.tokenizer.matches(meta.get("tokenizer_fingerprint")):
            raise CheckpointError(
                f"{path}: saved with tokenizer {meta.get('tokenizer_fingerprint')}, the data now "
                f"uses {self.tokenizer.fingerprint}")
        saved = meta.get("deepspeed", {})
        layout = meta.get("layout", {})
        if (saved.get("zero_stage"), layout.get("dp"), layout.get("tp")) != \
                (self.zero_stage, self.dims.dp, self.dims.tp):
            raise CheckpointError(
                f"{path}: DeepSpeed engine state saved with ZeRO-{saved.get('zero_stage')}, data "
                f"parallel {layout.get('dp')}, tensor parallel {layout.get('tp')}; this run has "
                f"ZeRO-{self.zero_stage}, {self.dims.dp}, {self.dims.tp}. Resume with the saved "
                f"layout, or start from its weights with checkpoint.init_from={path}")
        state_dir = path / ENGINE_STATE / ENGINE_TAG
        if not state_dir.is_dir():
            raise CheckpointError(f"{state_dir}: DeepSpeed engine state missing")
        self.model.checkpoint_engine.load = load_engine_file  # no arbitrary unpickling
        load_path, _ = self.model.load_checkpoint(
            str(path / ENGINE_STATE), tag=ENGINE_TAG, load_module_strict=True,
            load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{state_dir}: DeepSpeed could not load its engine state")
        self.restore_trainer_state(meta)

    def checkpoint_meta(self) -> dict:
        meta = super().checkpoint_meta()
        meta["deepspeed"] = {"zero_stage": self.zero_stage,
                             "offload_optimizer": self.cfg.parallel.offload_optimizer,
                             "offload_params": self.cfg.parallel.offload_params}
        return meta
