"""The megatron engine (`parallel.engine=megatron`, the default): megatron's DDP (fp32 gradient
buffer), its optimizer (distributed over data parallel by default) and its forward/backward
schedules (1F1B when pp > 1).

One step: the schedule calls `_forward_step` per micro-batch (with `overlap_grad_reduce`, each
gradient bucket's data-parallel reduction starts in the last micro-batch's backward) -> grad
finalisation (`_finalize_grads`: the data-parallel reduction finished, then shared-layer copies
summed over the stages holding them) -> one all-reduce deciding whether any rank saw a NaN or an
infinity (megamor/step_health.py; such a step is not applied) -> clip + AdamW step (with
`overlap_param_gather`, the updated weights are gathered during the next forward).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megamor import parallel
from megamor.engines.base import Engine, RouterStats, StepResult
from megamor.step_health import local_nonfinite, nonfinite_anywhere

OPTIMIZER_FORMAT = {
    # The only format that reshards over TP and PP; the memory-efficient variant avoids a path
    # that allocates on the CUDA device.
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


class MegatronEngine(Engine):
    name = "megatron"

    # ------------------------------------------------------------------ build

    def build(self, init_weights=None) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megamor.precision import wrap_for_precision
        from megamor.shims import install_optimizer_fixes

        cfg, dtype = self.cfg, self.ctx.dtype
        stage = self.build_stage()
        wrapped = wrap_for_precision(self.tcfg, stage)  # bf16: Float16Module, fp32 routers
        self.model = self.wrap_data_parallel(wrapped)
        # What megatron's schedule runs: the model, or (virtual pipeline) the stage's chunks,
        # all inside the one DDP (megamor.model.virtual_stage says why).
        self.chunks = list(stage.chunks) if self.virtual else [self.model]
        t = cfg.train
        ocfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16,
            params_dtype=dtype, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        install_optimizer_fixes()
        self.optimizer = get_megatron_optimizer(ocfg, [self.model])
        # The tied embedding's gradient is summed with the other shared copies
        # (parallel.allreduce_shared_grads); megatron's own embedding all-reduce is switched off
        # by giving its grad finaliser an embedding group of one rank.
        self._finalize_groups = ProcessGroupCollection.use_mpu_process_groups()
        if self.dims.pp > 1:
            self._finalize_groups.embd, _ = dist.new_subgroups(group_size=1)
        self.tcfg.no_sync_func = self.model.no_sync
        self.tcfg.finalize_model_grads_func = self._finalize_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss if dtype != torch.float32 else None
        if init_weights is not None:
            init_weights(stage)
            self.reload_weights()

    def wrap_data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """The one place data parallelism is configured: megatron's DDP (`ddp_config`), with
        every weight copied on several pipeline stages in a gradient bucket of its own
        (parallel.allreduce_shared_grads says why)."""
        from megatron.core.distributed import DistributedDataParallel
        parallel.bucket_cross_stage_params_alone(module, self.dims)
        return DistributedDataParallel(self.tcfg, ddp_config(self.cfg.parallel, self.device),
                                       module)

    @property
    def virtual(self) -> bool:
        return self.cfg.parallel.virtual_pipeline_size > 1

    def _schedule_args(self, batches: list, seq: int) -> dict:
        """The schedule's data iterators and send shape: one iterator per chunk under the
        interleaved schedule (each chunk takes every micro-batch), whose sends are [s', b,
        hidden] (a MoR wire travels folded: megamor.model.wire); 1F1B's shape function."""
        if not self.virtual:
            return {"data_iterator": iter(batches), "seq_length": seq,
                    "adjust_tensor_shapes_fn": self._adjust_shapes()}
        from megamor.model.wire import folded_rows
        wire, h = self.stage.wire_channels, self.tcfg.hidden_size
        if wire != h:
            tp = self.dims.tp if self.tcfg.sequence_parallel else 1
            seq = folded_rows(seq // tp, wire, h) * tp  # the schedule divides it by tp again
        return {"data_iterator": [iter(batches) for _ in self.chunks], "seq_length": seq}

    def reload_weights(self) -> None:
        """After `checkpoint.init_from` wrote the stage's weights: the optimizer's main (fp32)
        copies follow them."""
        self.optimizer.reload_model_params()

    def _finalize_grads(self, model_list, num_tokens=None, pg_collection=None,
                        force_all_reduce=False):
        """megatron's `finalize_model_grads` with the cross-stage sum of shared copies between
        its data-parallel reduction (`finish_grad_sync`, which waits for the buckets reduced
        during the backward under overlap) and the rest (sequence-parallel norm grads over TP,
        per-token scaling)."""
        from megatron.core.distributed import finalize_model_grads
        self.ctx.progress.enter("grad_sync", self._step)
        # The one DDP, whatever the schedule ran (a virtual pipeline's chunks share it: reducing
        # per chunk would reduce shared weights once per chunk holding them).
        model_list = [self.model]
        self.model.finish_grad_sync(force_all_reduce=force_all_reduce)
        parallel.allreduce_shared_grads(self.model, self.dims)
        with _grad_sync_finished(model_list):
            return finalize_model_grads(model_list, num_tokens,
                                        pg_collection=self._finalize_groups,
                                        force_all_reduce=force_all_reduce)

    def sync_params(self) -> None:
        """With `overlap_param_gather`, the distributed optimizer's step updates only this
        rank's shard of the weights; the rest arrive bucket by bucket in the next forward
        (megatron's forward pre-hooks, before each module's first call). Whatever reads the
        weights outside a forward (a checkpoint save) gathers them first."""
        if self.model.ddp_config.overlap_param_gather:
            self.model.start_param_sync(force_sync=True)

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

    def _adjust_shapes(self):
        """Pipeline sends carry the stage's wire tensor ([s, b, channels]), not [s, b, h]."""
        if self.dims.pp == 1:
            return None
        wire = self.stage.wire_channels

        def adjust(recv, send):
            return [(s[0], s[1], wire) for s in recv], [(s[0], s[1], wire) for s in send]
        return adjust

    def train_step(self, batches, step: int) -> StepResult:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        self._step = step
        self.begin_step()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.ctx.progress.enter("forward_backward", step)
        batches = list(batches)
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, model=self.chunks,
            num_microbatches=self.num_microbatches, micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False, **self._schedule_args(batches, cfg.model.seq_length))
        self.ctx.progress.enter("optimizer", step)
        lm = [l["lm_loss"] for l in losses]
        # A NaN or infinity in any rank's loss or gradients: no update (megamor/step_health.py).
        skipped = nonfinite_anywhere(local_nonfinite(lm, self._grad_tensors()), self.device)
        if skipped:
            ok, grad_norm = False, float("nan")
        else:
            ok, grad_norm, _ = self.optimizer.step()
        return StepResult(lm, grad_norm, skipped, bool(ok), RouterStats.of(self.stage))

    def _grad_tensors(self) -> list:
        """This rank's gradients, reduced: DDP's contiguous buffers (one tensor each)."""
        buffers = getattr(self.model, "buffers", None)
        if isinstance(buffers, list):
            return [b.grad_data for b in buffers + list(getattr(self.model,
                                                                "expert_parallel_buffers", []))]
        return [getattr(p, "main_grad", p.grad) for p in self.model.parameters()]

    def forward_only(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> list:
        """Through megatron's schedule, which also marks the first micro-batch (FP8 weight casts
        are refreshed). Without `labels` the logits are kept (and dropped)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        dims = self.dims

        def forward_step(data_iterator, model):
            next(data_iterator)
            if labels is None:
                return model(input_ids=tokens if dims.first_stage else None), None  # logits
            return model(input_ids=tokens if dims.first_stage else None,
                         labels=labels if dims.last_stage else None), self._loss

        # The interleaved schedule runs micro-batches in groups of pp: the batch goes through
        # pp times (the same result each time) and the first result is returned.
        n = self.dims.pp if self.virtual else 1
        out = get_forward_backward_func()(
            forward_step_func=forward_step, model=self.chunks, num_microbatches=n,
            micro_batch_size=tokens.shape[0], forward_only=True,
            **self._schedule_args([None] * n, tokens.shape[1]))
        return out[:1]

    # ------------------------------------------------------------------ checkpoint state

    def sharded_state_dict(self, is_loading: bool) -> dict:
        if not is_loading:
            self.sync_params()
        model_sd = self.stage.sharded_state_dict()
        if self.cfg.parallel.use_distributed_optimizer:
            opt_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=dict(OPTIMIZER_FORMAT))
        else:
            opt_sd = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        return {"model": model_sd, "optimizer": opt_sd}

    def load(self, path: Path, meta: dict, read_shards) -> None:
        loaded = read_shards(self.sharded_state_dict(is_loading=True))
        self.stage.load_state_dict(loaded["model"], strict=True)
        self.optimizer.load_state_dict(loaded["optimizer"])


def resolve_overlap(p, device: torch.device) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) of a run: as configured, or, left unset (null),
    on when the device is a GPU (the parameter gather only with the distributed optimizer)."""
    gpu = device.type == "cuda"
    grad = gpu if p.overlap_grad_reduce is None else bool(p.overlap_grad_reduce)
    gather = (gpu and p.use_distributed_optimizer) if p.overlap_param_gather is None \
        else bool(p.overlap_param_gather)
    return grad, gather


def ddp_config(p, device: torch.device):
    """megatron's DistributedDataParallelConfig for `parallel` config `p` on `device`: fp32
    gradient buffer, reduce-scattered for the distributed optimizer, reduced during the backward
    and gathered during the forward per `resolve_overlap`."""
    from megatron.core.distributed import DistributedDataParallelConfig
    grad, gather = resolve_overlap(p, device)
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=grad, overlap_param_gather=gather,
        use_distributed_optimizer=p.use_distributed_optimizer)


@contextmanager
def _grad_sync_finished(model_list):
    """megatron's `finalize_model_grads` starts with each chunk's `finish_grad_sync`; run
    already (`MegatronEngine._finalize_grads`), a second call would reduce again (no overlap) or
    find no handle (overlap). It is a no-op inside this context."""
    for chunk in model_list:
        chunk.finish_grad_sync = lambda *a, **k: None
    try:
        yield
    finally:
        for chunk in model_list:
            del chunk.finish_grad_sync
