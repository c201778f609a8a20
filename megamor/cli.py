"""`megamor`: one command, a subcommand per user action.

    megamor pretrain [--config FILE] [--nproc N] [--resume auto|DIR] [section.option=value ...]
    megamor config show|validate [--config FILE] [--world-size N] [overrides ...]
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _load(args):
    from megamor.config import ConfigError, load_config
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"megamor: config error: {e}")


def cmd_pretrain(args) -> int:
    from megamor.pretrain import run
    return run(args.config, args.overrides, nproc=args.nproc, resume=args.resume)


def cmd_config(args) -> int:
    import yaml
    from megamor.config import ConfigError
    cfg = _load(args)
    try:
        cfg.validate(world_size=args.world_size)
    except ConfigError as e:
        sys.exit(f"megamor: config error: {e}")
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print("config ok")
    return 0


def main(argv=None) -> int:
    # megatron-core's import-time and deprecation warnings are noise for every subcommand.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    from megamor.console import quiet_library_notices
    quiet_library_notices()
    ap = argparse.ArgumentParser(prog="megamor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model (vanilla, recursive or MoR)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to start (gloo on CPU)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint, or start fresh) or a "
                                    "checkpoint directory")
    p.add_argument("overrides", nargs="*", help="section.option=value")
    p.set_defaults(fn=cmd_pretrain)

    c = sub.add_parser("config", help="print or check a resolved config")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("--config")
    c.add_argument("--world-size", type=int, default=None)
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=cmd_config)

    from megamor.data.commands import add_parsers  # `tokenizer ...` and `data ...`
    add_parsers(sub)
    from megamor.commands import add_parsers as add_model_parsers  # `depth-map`
    add_model_parsers(sub)
    from megamor.evaluate import add_parsers as add_eval_parsers  # `eval`
    add_eval_parsers(sub)
    from megamor.hf.commands import add_parsers as add_hf_parsers  # `convert to-hf|from-hf`
    add_hf_parsers(sub)
    from megamor.generation.commands import add_parsers as add_generate_parsers  # `generate`
    add_generate_parsers(sub)
    from megamor.launch.slurm import add_parsers as add_launch_parsers  # `launch` (Slurm / torchrun)
    add_launch_parsers(sub)
    from megamor.planner import add_parsers as add_plan_parsers  # `plan` (layout planner)
    add_plan_parsers(sub)

    # Overrides may come before or after options (`pretrain x.y=1 --resume auto z.w=2`).
    args, extra = ap.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        ap.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if not hasattr(args, "overrides"):
            ap.error(f"{args.command} takes no overrides: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
