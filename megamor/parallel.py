"""Process groups: torch.distributed start-up, megatron's parallel state, and the groups that keep
copies of shared recursion layers identical across pipeline stages.

Vocabulary: tp / pp / dp = tensor / pipeline / data parallel. Process groups are created here,
once, and handed to what needs them (`ParallelDims`); nothing else creates groups.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from megamor.layout import Plan, unique_layers_of


@dataclass
class ParallelDims:
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    dp_group: object = None
    pp_group: object = None
    embedding_group: object = None  # first + last stage (pp > 1), holding the tied embedding
    # unique layer index -> process group over the pipeline stages holding a copy of it
    shared_layer_groups: dict = field(default_factory=dict)
    timeout_s: int = 1800  # every group's collective timeout (initialize's timeout_s)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(device: torch.device) -> str:
    """torch.distributed backend of the default group, inherited by every group created without
    an explicit backend (megatron's included).

    On GPUs both NCCL and gloo: CUDA tensors go through NCCL; barriers and object collectives
    (checkpoint planning, depth-map traces) go through gloo on the CPU, with no device memory or
    stream sync. Tensor collectives on the training path still use device tensors only, so they
    also run where a launcher set up a plain NCCL world itself (`tests/test_gpu_path.py`).
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


DEFAULT_TIMEOUT_S = 1800  # what megamor.watchdog.Timeouts gives without run.hang_timeout


def init_process_group(device: torch.device, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """Join the job from torchrun / Slurm-derived env vars, or form a world of one. A process
    group that already exists is kept as it is. `timeout_s`: every collective's timeout
    (megamor.watchdog.Timeouts.collective_s, from run.hang_timeout)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and object collectives use the current device
    if dist.is_initialized():
        return
    backend = process_group_backend(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1, timeout=timeout)


def initialize(tp: int, pp: int, device: torch.device,
               timeout_s: int = DEFAULT_TIMEOUT_S, vp: int = 1) -> ParallelDims:
    """`vp`: model chunks per pipeline stage (megatron then picks its interleaved schedule)."""
    init_process_group(device, timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
                                  distributed_timeout_minutes=-(-timeout_s // 60))
    dims = ParallelDims(
        world_size=world, rank=rank, tp=tp, pp=pp, dp=world // (tp * pp),
        tp_rank=mps.get_tensor_model_parallel_rank(),
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(), device=device,
        dp_group=mps.get_data_parallel_group(), pp_group=mps.get_pipeline_model_parallel_group(),
        timeout_s=timeout_s,
    )
    if pp > 1 and mps.is_rank_in_embedding_group(ignore_virtual=True):
        dims.embedding_group = mps.get_embedding_group()
    return dims


def create_shared_layer_groups(dims: ParallelDims, plan: Plan,
                               pieces: list[list[tuple[int, int]]], stage_module=None) -> None:
    """For every unique layer held by more than one stage, a group over those stages' ranks.

    Every rank calls `new_group` for every group in the same order (a torch.distributed rule),
    one group per (set of stages, pipeline) pair. Copies on all but the lowest holding stage are
    marked `shared`, megatron's flag for "already counted elsewhere" in the gradient norm (the
    same flag the tied output-layer copy carries).
    """
    holders: dict[int, tuple[int, ...]] = {}
    held = [set(unique_layers_of(plan, mine)) for mine in pieces]  # a stage's chunks share one
    for u in range(plan.num_unique):
        stages = tuple(p for p in range(len(pieces)) if u in held[p])
        if len(stages) > 1:
            holders[u] = stages
    if stage_module is not None:
        for u, copy in stage_module.layers.copy_index.items():
            if copy:
                for prm in stage_module.layers[str(u)].parameters():
                    prm.shared = True
    if not holders:
        return
    my_pp_ranks = dist.get_process_group_ranks(dims.pp_group)
    all_pp = [None] * dims.world_size
    dist.all_gather_object(all_pp, my_pp_ranks)
    pipelines = sorted({tuple(r) for r in all_pp})
    by_stages: dict[tuple[int, ...], object] = {}
    for stages in sorted(set(holders.values())):
        for pipe in pipelines:
            ranks = [pipe[s] for s in stages]
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=dims.timeout_s))
            if dims.rank in ranks:
                by_stages[stages] = group
    for u, stages in holders.items():
        if stages in by_stages:
            dims.shared_layer_groups[u] = by_stages[stages]


def unwrap_stage(model):
    """The model stage (megamor's MoRModel) inside whatever wraps it: megatron's
    DistributedDataParallel, and Float16Module in bf16 runs (which forwards no attributes).
    megatron's own `get_attr_wrapped_model` walks the `.module` chain."""
    from megatron.core.utils import get_attr_wrapped_model

    return get_attr_wrapped_model(model, "shared_embedding_or_output_weight", return_model_obj=True)


def cross_stage_params(model, dims: ParallelDims) -> list[tuple[object, list]]:
    """The weights copied on several pipeline stages, per group of the stages holding them:
    shared recursion layers, and the embedding tied to the output layer. [(group, params)],
    params in the same order on every stage of a group."""
    inner = unwrap_stage(model)
    per_group: dict[int, tuple[object, list]] = {}
    if dims.embedding_group is not None:
        w = inner.shared_embedding_or_output_weight()
        per_group[id(dims.embedding_group)] = (dims.embedding_group, [w])
    for u, group in dims.shared_layer_groups.items():
        layer = inner.layers[str(u)]
        per_group.setdefault(id(group), (group, []))[1].extend(
            p for p in layer.parameters() if p.requires_grad)
    return list(per_group.values())


def bucket_cross_stage_params_alone(model, dims: ParallelDims) -> None:
    """Before megatron's DDP is built: every weight copied on several stages gets a gradient
    bucket of its own (megatron's `shared_embedding` flag, which does only that, and only with
    the distributed optimizer), so that its data-parallel shards are the same slices on every
    stage holding a copy (`allreduce_shared_grads`)."""
    for _, params in cross_stage_params(model, dims):
        for p in params:
            p.shared_embedding = True


def allreduce_shared_grads(model, dims: ParallelDims) -> None:
    """Sum the gradients of weights copied on several stages over the stages that hold them
    (`cross_stage_params`).

    Runs after megatron's data-parallel reduction has finished (`finish_grad_sync`), which with
    `overlap_grad_reduce` happens bucket by bucket during the backward. Both reductions are
    sums (DDP's 1/dp scaling is linear), so the result is the same in either order:
    - all-reduce over data parallel: every rank holds the whole reduced gradient; summing it over
      the stages is the sum over stages and data-parallel ranks.
    - distributed optimizer (reduce-scatter): data-parallel rank r holds the reduced values of
      the r-th shard of each bucket only, and only that shard is read by the optimizer. Each
      copied weight is alone in its bucket (`bucket_cross_stage_params_alone`), at the bucket's
      start, and the bucket is padded by the same rule on every stage, so shard r covers the same
      slice of the weight on every stage; the ranks summed here (one pipeline) share r. The
      other slices hold this rank's unreduced gradients and are summed to no use.
    """
    for group, params in cross_stage_params(model, dims):
        grads = [g for g in (getattr(p, "main_grad", p.grad) for p in params) if g is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def shutdown() -> None:
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
