"""Subcommands around a trained checkpoint (`megamor depth-map`, `megamor checkpoint verify`)."""

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
    from megamor.evaluate import routing_mode

    ids = tok.encode(text)[: cfg.model.seq_length]
    with routing_mode(model, args.routing):
        depths = routing_depths(model, ids)
    pieces = [tok.decode([i]) for i in ids]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_depth = cfg.model.num_recursions
    how = "top-k (training)" if args.routing == "topk" else "threshold (inference)"
    title = f"recursion depth per token, {how} routing: {args.checkpoint}"
    (out / "depth_map.html").write_text(render_html(pieces, depths, max_depth, title=title))
    render_png(pieces, depths, max_depth, out / "depth_map.png", width_px=args.width, title=title)
    mean = sum(depths) / max(len(depths), 1)
    print(f"{len(ids)} tokens, mean depth {mean:.2f} of {max_depth} ({args.routing} routing): "
          f"{out / 'depth_map.html'}, {out / 'depth_map.png'}")
    return 0


def cmd_checkpoint_verify(args) -> int:
    """Every file of a checkpoint against the size and checksum its megamor.json lists; for a
    checkpoint root, each of its checkpoints, newest first. Exit 1 if any is not intact."""
    from megamor.checkpoint import CheckpointError, is_complete, resume_candidates, verify_checkpoint

    path = Path(args.path)
    try:
        paths = [path] if is_complete(path) else resume_candidates(str(path), path)[0]
    except CheckpointError as e:
        sys.exit(f"megamor: checkpoint error: {e}")
    if not paths:
        sys.exit(f"megamor: checkpoint error: {path}: no checkpoint (step_*) there")
    bad = 0
    for p in paths:
        try:
            print(verify_checkpoint(p), flush=True)
        except CheckpointError as e:
            bad += 1
            print(f"{p}: FAILED: {e}", flush=True)
    if bad:
        print(f"megamor: checkpoint error: {bad} of {len(paths)} checkpoint(s) failed "
              f"verification", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    c = sub.add_parser("checkpoint", help="verify checkpoints against their checksums")
    csub = c.add_subparsers(dest="action", required=True)
    v = csub.add_parser("verify", help="check every file of a checkpoint (or of each checkpoint "
                                       "of a root) against its size and checksum")
    v.add_argument("path", help="a checkpoint directory, or a checkpoint root")
    v.set_defaults(fn=cmd_checkpoint_verify)

    p = sub.add_parser("depth-map", help="render per-token recursion depth of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory (or a checkpoint root: newest)")
    p.add_argument("--text")
    p.add_argument("--text-file")
    p.add_argument("--out", default="depth_map")
    p.add_argument("--width", type=int, default=1200, help="PNG width in pixels")
    p.add_argument("--routing", choices=["threshold", "topk"], default="threshold",
                   help="threshold: inference routing (each router's own decision per token); "
                        "topk: as in training (expert-choice capacity top-k over the sequence)")
    p.set_defaults(fn=cmd_depth_map)
