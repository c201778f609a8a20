"""`megamor convert to-hf|from-hf`: Hugging Face export and import."""

from __future__ import annotations

import sys


def cmd_to_hf(args) -> int:
    from megamor.checkpoint import CheckpointError
    from megamor.hf.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (CheckpointError, ExportError) as e:
        sys.exit(f"megamor: convert to-hf: {e}")
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def cmd_from_hf(args) -> int:
    from megamor.hf.importer import ImportError_, import_hf

    try:
        out = import_hf(args.model, args.out, overrides=args.overrides, init=args.init,
                        overwrite=args.overwrite)
    except ImportError_ as e:
        sys.exit(f"megamor: convert from-hf: {e}")
    print(f"imported {args.model} -> {out}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to / from Hugging Face format")
    conv = p.add_subparsers(dest="direction", required=True)
    t = conv.add_parser("to-hf", help="export a megamor checkpoint (any parallel layout) to a "
                                       "Hugging Face model directory")
    t.add_argument("checkpoint", help="checkpoint directory (or a checkpoint root: newest)")
    t.add_argument("out", help="output directory")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    t.set_defaults(fn=cmd_to_hf)
    f = conv.add_parser("from-hf", help="import a Llama-family Hugging Face model as a megamor "
                                         "checkpoint (vanilla, or recursive/MoR for up-training)")
    f.add_argument("model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    f.add_argument("out", help="output checkpoint directory")
    f.add_argument("--init", default="stepwise",
                   choices=["average", "stepwise", "lower", "upper", "random"],
                   help="how the shared block of a recursive/MoR model is initialised")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("overrides", nargs="*", help="section.option=value (e.g. model.arch=mor "
                                                 "model.num_recursions=3)")
    f.set_defaults(fn=cmd_from_hf)
