"""`megamor`: one command, a subcommand per user action.

    megamor pretrain [--config FILE] [--nproc N] [--resume auto|DIR] [section.option=value ...]
    megamor config show|validate [--config FILE] [--world-size N] [overrides ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
import warnings


def _quiet() -> None:
    # megatron-core warns at import about optional GPU packages; the run log says what is used.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _load(args):
    from megamor.config import ConfigError, load_config
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"megamor: config error: {e}")


def cmd_pretrain(args) -> int:
    from launch.local import relaunch, under_launcher
    from megamor import errors

    if args.resume:
        args.overrides.append(f"checkpoint.resume={args.resume}")
    launched = under_launcher()
    rank = int(os.environ["RANK"]) if launched else 0
    world = int(os.environ["WORLD_SIZE"]) if launched else args.nproc
    cfg = None
    try:  # everything checkable, before any rank starts (again in each rank: cheap)
        from megamor.config import load_config
        from megamor.preflight import check_before_start
        cfg = load_config(args.config, args.overrides)
        warnings_ = check_before_start(cfg, world)
        # Said once: by this process, or by rank 0 of a launch that `--nproc` did not start.
        from megamor.lifecycle import LAUNCHER_PID_ENV
        if rank == 0 and not (launched and os.environ.get(LAUNCHER_PID_ENV)):
            for w in warnings_:
                print(f"megamor: warning: {w}", file=sys.stderr, flush=True)
    except errors.input_errors() as e:
        if launched and cfg is not None:  # ranks of a launch: one line per distinct error
            errors.report(e, Path(cfg.run.output_dir), rank, world)
        elif rank == 0:
            print(errors.one_line(e), file=sys.stderr, flush=True)
        return errors.EXIT_BAD_INPUT
    if args.nproc > 1 and not under_launcher():
        rank_args = ["pretrain"] + (["--config", args.config] if args.config else []) + args.overrides
        from megamor.lifecycle import PREEMPTED_MARKER
        from megamor.watchdog import local_watcher
        return relaunch(args.nproc, rank_args, Path(cfg.run.output_dir) / PREEMPTED_MARKER,
                        ranks_catch_signals=cfg.checkpoint.save_on_signal,
                        watcher=local_watcher(cfg, args.nproc))
    _quiet()
    from megamor import parallel
    from megamor.engines import create_trainer
    from megamor.trainer import Preempted
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    try:
        create_trainer(cfg).train()
    except Preempted as e:
        from megamor.lifecycle import preempted_exit_code
        return preempted_exit_code(e.code)  # 0 under `--nproc N`, which then returns 75
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line per distinct error
        return errors.report(e, Path(cfg.run.output_dir), rank, world)
    finally:
        parallel.shutdown()
    return 0


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
    from launch.slurm import add_parsers as add_launch_parsers  # `launch` (Slurm / torchrun)
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
