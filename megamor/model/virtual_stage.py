"""One pipeline rank's model chunks under megatron's interleaved (virtual) pipeline schedule.

With `parallel.virtual_pipeline_size` = V > 1 the unrolled network is cut into pp x V pieces
(`layout.stage_pieces`); a rank runs V of them, each a `MoRModel` chunk that megatron's
schedule calls on its own (`chunks`, in chunk order). A shared recursion layer can run in
several chunks of one rank: the chunks then hold the same module (built once, by the first
chunk), so the rank keeps one copy of its weights and one gradient, which every chunk's backward
adds into.

`VirtualStage` is what the rest of megamor sees as "the stage": megatron's DDP wraps it whole
(one gradient buffer, each shared parameter once), checkpoints read one sharded state dict from
it (each layer once, the same keys as a contiguous stage, so any layout resumes any other), and
it answers what the loop, the engines and the metrics ask of a stage (router statistics over
its chunks, the tied embedding, the unique layers).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megamor.model.mor_model import MoRModel, UniqueLayers


def _on_every_part(name: str, doc: str) -> property:
    """An attribute the loop sets on "the stage" that every chunk must see (read from the first)."""
    def get(self):
        return getattr(self.parts[0], name)

    def set_(self, value):
        for part in self.parts:
            setattr(part, name, value)
    return property(get, set_, doc=doc)


class VirtualStage(nn.Module):
    """A pipeline rank's V model chunks (`chunks`: what megatron's schedule calls, wrapped for
    precision by `wrap_chunks`; `parts`: the MoRModels themselves)."""

    aux_loss_scale = _on_every_part("aux_loss_scale", "1 / micro-batches (set per step)")
    trace_routing = _on_every_part("trace_routing", "record routing decisions (depth maps)")

    def __init__(self, chunks: list[MoRModel]):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        first, last = chunks[0], chunks[-1]
        self.config = first.config
        self.model_type = first.model_type
        self.share_embeddings_and_output_weights = True
        self.pre_process, self.post_process = first.pre_process, last.post_process
        self.routed = first.routed
        self.mcfg, self.rcfg, self.plan = first.mcfg, first.rcfg, first.plan
        self.wire_channels = first.wire_channels
        layers = UniqueLayers(first.layers.copy_index)
        for chunk in chunks:
            for u, layer in chunk.layers.items():
                layers[u] = layer
        # Kept out of the module tree: the chunks own these modules (registering them here too
        # would name every parameter twice in state dicts).
        object.__setattr__(self, "_layers", layers)

    @property
    def parts(self) -> list[MoRModel]:
        """The chunks' MoRModels (inside their precision wrappers, if any)."""
        return [c if isinstance(c, MoRModel) else c.module for c in self.chunks]

    @property
    def layers(self) -> UniqueLayers:
        """Every unique layer the rank holds, once (keyed like `MoRModel.layers`)."""
        return self._layers

    @property
    def routers(self) -> dict:
        """Every router of the rank's chunks, keyed by recursion step (one chunk holds each)."""
        return {k: r for part in self.parts for k, r in part.routers.items()}

    def wrap_chunks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each chunk by `wrap(chunk)` (bf16: megatron's Float16Module, which casts the
        first chunk's input and the last chunk's output by the chunk's `vp_stage`)."""
        self.chunks = nn.ModuleList([wrap(c) for c in self.parts])

    def forward(self, *args, **kwargs):
        raise RuntimeError("a VirtualStage is run chunk by chunk by megatron's interleaved "
                           "schedule (MegatronEngine), not called whole")

    # ------------------------------------------------------------ what the loop asks of a stage

    def shared_embedding_or_output_weight(self):
        for part in self.parts:
            if part.pre_process or part.post_process:
                return part.shared_embedding_or_output_weight()
        return None

    @property
    def routing_trace(self) -> dict:
        out = {}
        for part in self.parts:
            out.update(part.routing_trace)
        return out

    def reset_stats(self) -> None:
        for part in self.parts:
            part.reset_stats()

    def stat_keys(self) -> list[str]:
        return self.parts[0].stat_keys()

    def update_router_bias(self) -> None:
        for part in self.parts:
            part.update_router_bias()

    # ------------------------------------------------------------ checkpoint state

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The chunks' sharded state, each module once: the keys a contiguous stage holding the
        same layers would have (`MoRModel.sharded_state_dict`)."""
        out: dict = {}
        for part in self.parts:
            for key, value in part.sharded_state_dict(prefix, sharded_offsets, metadata).items():
                out.setdefault(key, value)
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict keyed as `sharded_state_dict` names it into every chunk (a shared
        layer is loaded once per chunk holding it: the same tensors)."""
        used = set()
        for part in self.parts:
            mine = {k: state_dict[k] for k in part.state_dict(keep_vars=True) if k in state_dict}
            part.load_state_dict(mine, strict=strict, assign=assign)  # names what is missing
            used.update(mine)
        unexpected = [k for k in state_dict if k not in used]
        if unexpected and strict:
            raise RuntimeError(f"unexpected keys for this pipeline rank's chunks: {unexpected[:5]}")
        return torch.nn.modules.module._IncompatibleKeys([], unexpected)
