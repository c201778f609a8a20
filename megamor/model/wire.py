"""The wire between pipeline chunks under megatron's interleaved schedule.

A MoR stage sends `[x | base | active | gate]` per token ([s, b, 2h + 2], `StageState.pack`).
megatron's interleaved schedule sends and receives tensors of one shape, [s', b, hidden] (it
takes no shape function, unlike 1F1B's `adjust_tensor_shapes_fn`). The wire is therefore sent
folded: flattened, zero-padded to the next whole [rows, b, hidden] and viewed as that, with
rows = ceil(s * channels / hidden) (`folded_rows`). The receiver recovers s from rows alone:
s = floor(rows * hidden / channels) is the only length that folds to `rows` when
channels > hidden. Folding is a view plus one pad: gradients flow through it unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def folded_rows(seq: int, channels: int, hidden: int) -> int:
    """Rows of the folded [rows, b, hidden] tensor carrying a [seq, b, channels] wire."""
    return -(-seq * channels // hidden)


def fold_wire(wire: Tensor, hidden: int) -> Tensor:
    """[s, b, channels] -> [rows, b, hidden] (zero-padded at the end)."""
    s, b, c = wire.shape
    rows = folded_rows(s, c, hidden)
    flat = wire.reshape(-1)
    return F.pad(flat, (0, rows * b * hidden - flat.numel())).view(rows, b, hidden)


def unfold_wire(folded: Tensor, channels: int) -> Tensor:
    """[rows, b, hidden] -> the [s, b, channels] wire it carries."""
    rows, b, h = folded.shape
    if channels <= h:
        raise ValueError(f"a wire of {channels} channels is not folded (hidden {h})")
    s = rows * h // channels
    return folded.reshape(-1)[:s * b * channels].view(s, b, channels)
