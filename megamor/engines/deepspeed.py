"""The DeepSpeed engine (`parallel.engine=deepspeed`): megamor's MoR model trained under DeepSpeed's
ZeRO-1/2/3 instead of megatron's DDP and distributed optimizer.

What stays megamor's (the loop's, megamor/training/): data order, router statistics, the log line
and MLflow, the LR schedule (megatron's OptimizerParamScheduler driving the optimizer's parameter
groups, with megatron's weight-decay groups), and the checkpoint directory: `step_N/` holds the
model weights as megatron dist_checkpointing shards, readable by `megamor convert`, `eval`,
`depth-map` and `checkpoint.init_from` as from the megatron engine, plus `step_N/deepspeed/`,
DeepSpeed's own engine state (ZeRO-partitioned optimizer state) for an exact resume with this
engine. Configuration: megamor/engines/deepspeed_config.py; ZeRO-3 residency of the shared
recursion block and the traffic meters: megamor/engines/zero3.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megamor.checkpoint_meta import CheckpointError
from megamor.engines.base import Engine, RouterStats, StepResult
from megamor.engines.deepspeed_config import (MegatronMPU, apply_overrides, deepspeed_config,
                                              load_engine_file, param_groups, prepare_deepspeed)
from megamor.engines.zero3 import (AllGatherMeter, ParamGatherMeter, SharedBlockResidency,
                                   shared_block_params)

ENGINE_STATE = "deepspeed"  # subdirectory of a checkpoint holding DeepSpeed's engine state
ENGINE_TAG = "state"


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    measures_collective_wait = False  # its collectives run inside backward() and step()

    def build(self, init_weights=None) -> None:
        """The stage, `checkpoint.init_from` weights loaded into the plain module, then the
        DeepSpeed engine, which partitions those weights (ZeRO-3) and copies them into its
        optimizer."""
        stage = self.build_stage()
        self.residency: Optional[SharedBlockResidency] = None
        self.allgather_meter: Optional[AllGatherMeter] = None
        self.shared_meter: Optional[ParamGatherMeter] = None
        if init_weights is not None:
            init_weights(stage)
        prepare_deepspeed(self.device)
        import deepspeed

        cfg, dims = self.cfg, self.dims
        generated = deepspeed_config(cfg, dims.dp, self.num_microbatches, self.device.type,
                                     self.ctx.dtype == torch.bfloat16)
        self.ds_config, overridden = apply_overrides(generated, cfg.parallel.deepspeed_config)
        if dims.rank == 0:
            for line in overridden:
                print(f"deepspeed config: {cfg.parallel.deepspeed_config} overrides {line}",
                      flush=True)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=stage, model_parameters=param_groups(stage, cfg), config=self.ds_config,
            mpu=MegatronMPU() if dims.tp > 1 else None, dist_init_required=False)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        if self.zero_stage == 3:
            from deepspeed.runtime.zero import register_external_parameter
            if stage.pre_process and stage.post_process:
                # The output layer multiplies by the embedding's (tied) weight.
                register_external_parameter(stage.output_layer,
                                            stage.shared_embedding_or_output_weight())
            if cfg.parallel.zero3_shared_block == "once" and stage._loop_span:
                self.residency = SharedBlockResidency(shared_block_params(stage))
                stage.recursion_scope = self.residency
            self.allgather_meter = AllGatherMeter()
            if stage._loop_span:
                self.shared_meter = ParamGatherMeter(shared_block_params(stage))

    # ------------------------------------------------------------------ one step

    def train_step(self, batches, step: int) -> StepResult:
        self.begin_step()
        for meter in (self.allgather_meter, self.shared_meter):
            if meter is not None:
                meter.take()  # not counting a depth map's forward since the last step
        losses = []
        shared = {"forward": 0, "backward": 0}
        self.ctx.progress.enter("forward_backward", step)  # and the ZeRO collectives
        for batch in batches:
            per_token = self.model(input_ids=batch["tokens"].to(self.device),
                                   labels=batch["labels"].to(self.device))
            loss = per_token.float().mean()
            if self.shared_meter is not None:
                shared["forward"] += self.shared_meter.take()
            self.model.backward(loss)  # scaled by 1 / accumulation steps, as megatron's schedule
            if self.shared_meter is not None:
                shared["backward"] += self.shared_meter.take()
            self.model.step()  # an optimizer step at the accumulation boundary only
            losses.append(loss.detach())
        grad_norm = self.model.get_global_grad_norm()
        # DeepSpeed's ZeRO optimizers (>= 0.19.8, every stage, fp32 and bf16) skip the update of
        # a step whose global gradient norm is not finite; megamor counts it (step_health.py).
        applied = bool(self.model.was_step_applied())
        extra = {}
        if self.allgather_meter is not None:  # this rank's ZeRO-3 parameter all-gathers
            extra["zero3/allgather_bytes"] = self.allgather_meter.take()
        if self.shared_meter is not None:  # of which the shared recursion block's weights
            for k, v in shared.items():
                extra[f"zero3/shared_block_{k}_bytes"] = v
        return StepResult(losses, grad_norm, not applied, applied, RouterStats.of(self.stage),
                          extra)

    def forward_only(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> list:
        if labels is None:
            self.model(input_ids=tokens)
            return []
        return [{"lm_loss": self.model(input_ids=tokens, labels=labels).float().mean()}]

    # ------------------------------------------------------------------ checkpoint state

    def checkpoint_meta(self) -> dict:
        p = self.cfg.parallel
        return {"engine": self.name,
                "deepspeed": {"zero_stage": self.zero_stage,
                              "offload_optimizer": p.offload_optimizer,
                              "offload_params": p.offload_params}}

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

    def save_files(self, directory: Path) -> None:
        """DeepSpeed's engine state (each rank its ZeRO partition of the optimizer state)."""
        self.model.save_checkpoint(str(directory / ENGINE_STATE), tag=ENGINE_TAG,
                                   save_latest=False)

    def load(self, path: Path, meta: dict, read_shards) -> None:
        """Exact resume: DeepSpeed restores module weights and ZeRO-partitioned optimizer state
        from `<checkpoint>/deepspeed` (the shards, the same weights, are not read)."""
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
