"""Which device a rank trains on (`train.device`), and which GPU when it is CUDA.

A rank's GPU is `cuda:LOCAL_RANK` only when the rank sees every GPU of its node. Where the
launcher binds GPUs per task (Slurm `--gpus-per-task=1`, `--gpu-bind=single:1`, or a
CUDA_VISIBLE_DEVICES set per rank) each rank sees just its own, as `cuda:0`, while LOCAL_RANK
still counts 0..7: `cuda:LOCAL_RANK` would then name a device that does not exist.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch


def cuda_index(local_rank: int, visible: int, local_world_size: Optional[int] = None) -> int:
    """The index, among the `visible` GPUs, of the one a rank with `local_rank` uses.

    - every rank sees all of the node's GPUs (visible >= local world size, or local_rank fits
      when the local world size is unknown): `local_rank`;
    - each rank sees one GPU (bound per task): 0;
    - otherwise no rule can be right: an error that says what was seen.
    """
    if visible < 1:
        raise RuntimeError("no CUDA GPU is visible to this rank")
    if local_world_size is not None and visible >= local_world_size:
        return local_rank
    if visible == 1:
        return 0
    if local_world_size is None and local_rank < visible:
        return local_rank
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} of {local_world_size or '?'} ranks on this node, but this rank "
        f"sees {visible} GPUs (CUDA_VISIBLE_DEVICES={seen!r}): give every rank all of the "
        f"node's GPUs or exactly one (e.g. srun --gpus-per-task=1)")


def local_cuda_device(env: Mapping[str, str] = os.environ) -> torch.device:
    """This rank's GPU from LOCAL_RANK / LOCAL_WORLD_SIZE and the GPUs it sees."""
    local_rank = int(env.get("LOCAL_RANK", "0"))
    lws = env.get("LOCAL_WORLD_SIZE")
    return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count(),
                                           int(lws) if lws else None))


def resolve_device(cfg) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return local_cuda_device()
    return torch.device("cpu")
