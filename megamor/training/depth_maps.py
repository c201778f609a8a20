"""Depth maps during training (docs/tracking.md): the recursion depth of each token of a fixed
sample, drawn at `tracking.depth_map_interval` through the model as it is laid out, written to
`<run>/depth_maps/step_XXXXXXXX.{html,png}` and logged as MLflow artifacts. Rendering:
megamor/depth_map.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megamor.data import get_batch
from megamor.model.mor_model import fp8_padded


def routing_depths(engine, ids: list[int]) -> Optional[list[int]]:
    """Recursion depth of each token of `ids` under inference (threshold) routing: one
    forward-only pass of the engine (every rank takes part); each pipeline stage records the
    routing of the steps whose routers it holds, and the records of a pipeline are gathered.
    Returns the depths on global rank 0, None elsewhere. Training is left as it was: no
    gradients, train mode, RNG state and router statistics restored."""
    from megamor.inference import depths_from_trace

    stage, dims = engine.stage, engine.dims
    tokens = torch.tensor([fp8_padded(ids, engine.tcfg)], device=engine.device)  # [1, s']
    with engine.training_untouched(train_mode=False):
        stage.trace_routing = True
        try:
            engine.forward_only(tokens)
        finally:
            stage.trace_routing = False
        trace = {r: m[:len(ids), 0].tolist() for r, m in stage.routing_trace.items()}
    traces = [None] * dims.pp
    dist.all_gather_object(traces, trace, group=dims.pp_group)
    if dims.rank != 0:
        return None
    return depths_from_trace({r: t for tr in traces for r, t in tr.items()}, stage.rcfg.type)


class DepthMaps:
    def __init__(self, cfg, engine, tokenizer, dataset):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        # The fixed sample: `tracking.depth_map_text`, else the first training sequence (the
        # same on every rank).
        text = cfg.tracking.depth_map_text
        self.ids = (tokenizer.encode(text)[: cfg.model.seq_length] if text
                    else get_batch(dataset, [0])["tokens"][0].tolist())

    def due(self, step: int) -> bool:
        """`tracking.depth_map_interval`: None = with every checkpoint save (periodic and final),
        0 = never, N = every N steps. Routed models only (the others have one depth)."""
        t, c = self.cfg.tracking, self.cfg.checkpoint
        if not self.engine.stage.routed or not self.ids:
            return False
        if t.depth_map_interval is None:
            return bool(c.save_interval and step % c.save_interval == 0) \
                or step == self.cfg.train.train_steps
        return t.depth_map_interval > 0 and step % t.depth_map_interval == 0

    def log(self, out: Path, step: int, tracker) -> None:
        """The depth map of the fixed sample at `step`. Every rank takes part in the forward;
        rank 0 renders. A rendering failure is reported, never raised (training goes on)."""
        from megamor.depth_map import write_depth_map

        depths = routing_depths(self.engine, self.ids)
        if depths is None:
            return
        try:
            pieces = [self.tokenizer.decode([i]) for i in self.ids]
            paths = write_depth_map(out / "depth_maps", f"step_{step:08d}", pieces, depths,
                                    self.cfg.model.num_recursions,
                                    title=f"recursion depth per token at step {step}")
        except Exception as e:  # noqa: BLE001 - observability must not stop training
            print(f"WARNING: depth map at step {step} not written: {type(e).__name__}: {e}",
                  flush=True)
            return
        for p in paths:
            tracker.log_artifact(p, artifact_path="depth_maps")
