"""`megamor pretrain` as a function: what the CLI and the Slurm launcher (megamor/launch/slurm.py)
both run.

    run(config, overrides, nproc=1, resume=None) -> exit code

Everything checkable is checked before any rank starts (megamor/preflight.py; again in each
rank, where it is cheap); `nproc > 1` outside a launcher starts the ranks through torchrun
(megamor/launch/local.py) with the node's hang watcher; inside a launch this process is one
rank and trains (megamor/training/loop.py). Errors are one line per distinct error
(megamor/errors.py) with the exit codes documented there.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional


def _quiet() -> None:
    # megatron-core warns at import about optional GPU packages; the run log says what is used.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def run(config: Optional[str], overrides: list[str], nproc: int = 1,
        resume: Optional[str] = None) -> int:
    from megamor import errors
    from megamor.console import quiet_library_notices
    from megamor.launch.local import relaunch, under_launcher

    quiet_library_notices()  # before torch and megatron load (the Slurm launcher calls run())

    overrides = list(overrides) + ([f"checkpoint.resume={resume}"] if resume else [])
    launched = under_launcher()
    rank = int(os.environ["RANK"]) if launched else 0
    world = int(os.environ["WORLD_SIZE"]) if launched else nproc
    cfg = None
    try:  # everything checkable, before any rank starts (again in each rank: cheap)
        from megamor.config import load_config
        from megamor.preflight import check_before_start
        cfg = load_config(config, overrides)
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
    if nproc > 1 and not launched:
        rank_args = ["pretrain"] + (["--config", config] if config else []) + overrides
        from megamor.lifecycle import PREEMPTED_MARKER
        from megamor.node_watcher import local_watcher
        return relaunch(nproc, rank_args, Path(cfg.run.output_dir) / PREEMPTED_MARKER,
                        ranks_catch_signals=cfg.checkpoint.save_on_signal,
                        watcher=local_watcher(cfg, nproc))
    _quiet()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megamor import parallel
    from megamor.training.loop import Preempted, Trainer
    try:
        Trainer(cfg, keep_history=False).train()
    except Preempted as e:
        from megamor.lifecycle import preempted_exit_code
        return preempted_exit_code(e.code)  # 0 under `--nproc N`, which then returns 75
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line per distinct error
        return errors.report(e, Path(cfg.run.output_dir), rank, world)
    finally:
        parallel.shutdown()
    return 0
