"""Subcommands around a trained checkpoint (`megamor depth-map`)."""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_depth_map(args) -> int:
    from megamor.checkpoint import CheckpointError
    from megamor.depth_map import render_html, render_png
    from megamor.inference import load_for_inference, routing_depths

    text = Path(args.text_file).read_text() if args.text_file else args.text
    if not text:
        sys.exit("megamor: depth-map needs --text or --text-file")
    try:
        model, cfg, tok = load_for_inference(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"megamor: checkpoint error: {e}")
    ids = tok.encode(text)[: cfg.model.seq_length]
    depths = routing_depths(model, ids)
    pieces = [tok.decode([i]) for i in ids]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_depth = cfg.model.num_recursions
    (out / "depth_map.html").write_text(render_html(pieces, depths, max_depth,
                                                    title=f"{args.checkpoint}"))
    render_png(pieces, depths, max_depth, out / "depth_map.png", width_px=args.width)
    mean = sum(depths) / max(len(depths), 1)
    print(f"{len(ids)} tokens, mean depth {mean:.2f} of {max_depth}: {out / 'depth_map.html'}, "
          f"{out / 'depth_map.png'}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("depth-map", help="render per-token recursion depth of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (or a checkpoint root: newest)")
    p.add_argument("--text")
    p.add_argument("--text-file")
    p.add_argument("--out", default="depth_map")
    p.add_argument("--width", type=int, default=1200, help="PNG width in pixels")
    p.set_defaults(fn=cmd_depth_map)
