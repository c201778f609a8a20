"""Errors a person reads: one line per distinct error, the traceback in a log file, exit codes.

    0   finished
    1   an error inside the ranks (data, checkpoint, training ...): one line
        `megamor: <kind> error: ...`; the traceback is in `<output_dir>/logs/rank_<R>.log`.
        Among them: a failed checkpoint save (`megamor: checkpoint error: saving ... failed:
        No space left on device ...`; the `.tmp` removed, the previous checkpoint intact) and
        too many non-finite steps in a row (`train.on_nonfinite`)
    2   bad input found before any rank started (`megamor pretrain`'s pre-start checks,
        megamor/preflight.py; `python -m megamor.launch.slurm --check`)
    75  a checkpoint was saved on a signal (EXIT_PREEMPTED, megamor/checkpoint.py)
    76  a rank stalled: the hang watchdog ended the job (EXIT_HUNG, megamor/watchdog.py)

Every rank that fails writes its traceback to its log file. The one-line report is printed by
one rank per distinct error: ranks of one launch claim the error's line with a file created
exclusively under `<output_dir>/logs/.claims/` (rank 0 alone when that directory cannot be
written). A rank whose error is only the consequence of another rank's exit (a closed
connection in a collective) prints nothing when another rank has reported.

An error's kind is a class attribute: `InputError` (bad input: config, data, tokenizer,
checkpoint, output directory) is the base of megamor's input errors, each naming its `kind`
(`megamor.config.ConfigError`, `megamor.data.DataError`, `tokenizer.TokenizerError`,
`megamor.checkpoint.CheckpointError`, `megamor.preflight.PreflightError`). This module imports
nothing from megamor, so every module may import it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Mapping, Optional

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "connection refused",
              "socket closed", "nccl communicator was aborted", "watchdog caught collective")


class InputError(Exception):
    """Bad input, as opposed to a bug or a failure during training; subclasses set `kind`, the
    word of their one-line report (`megamor: <kind> error: ...`)."""

    kind = "input"


class PreflightError(InputError, RuntimeError):
    """A run that cannot start; `kind` is the error line's kind (`output`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """`config`, `data`, `checkpoint`, `output` or `training` (anything else): the exception's
    `kind` (the class attribute of an `InputError`)."""
    kind = getattr(exc, "kind", None)
    return kind if isinstance(kind, str) else "training"


def input_errors() -> tuple[type, ...]:
    """The exception types that mean bad input (config, data, tokenizer, checkpoint, output
    directory), as opposed to a bug or a failure during training."""
    return (InputError,)


def one_line(exc: BaseException) -> str:
    """`megamor: <kind> error: <message>` on one line (a multi-line message is joined)."""
    kind = error_kind(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if kind == "training":
        text = f"{type(exc).__name__}: {text}"
    return f"megamor: {kind} error: {text}"


def launch_id(env: Mapping[str, str] = os.environ) -> str:
    """What the ranks of one launch share and the next launch does not."""
    if env.get("TORCHELASTIC_RUN_ID"):
        return env["TORCHELASTIC_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        return (f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_RESTART_COUNT', '0')}-"
                f"{env.get('SLURM_STEP_ID', '')}")
    return f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '')}-{os.getppid()}"


def _peer_gone(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in _PEER_GONE)


def write_traceback(exc: BaseException, output_dir: Path, rank: int) -> Optional[Path]:
    """Append the traceback to `<output_dir>/logs/rank_<rank>.log`; None if it cannot."""
    path = Path(output_dir) / "logs" / f"rank_{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} rank {rank} launch {launch_id()}\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return path


def _claim(claims: Path, key: str) -> Optional[bool]:
    """True if this process is the first to claim `key`, False if another did, None if the
    claims directory is unusable."""
    try:
        claims.mkdir(parents=True, exist_ok=True)
        fd = os.open(claims / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
        return True
    except FileExistsError:
        return False
    except OSError:
        return None


def _others_reported(claims: Path, prefix: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if any(p.name.startswith(prefix) for p in claims.iterdir()):
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def report(exc: BaseException, output_dir: Path, rank: int, world_size: int,
           peer_wait_s: float = 3.0) -> int:
    """Log `exc`'s traceback and print its one line if this rank is the one to; returns the exit
    code (EXIT_FAILED)."""
    log = write_traceback(exc, output_dir, rank)
    line = one_line(exc) + (f" (traceback: {log})" if log else "")
    if world_size <= 1:
        show = True
    else:
        claims, lid = Path(output_dir) / "logs" / ".claims", launch_id()
        prefix = hashlib.sha1(lid.encode()).hexdigest()[:12]
        consequence = (error_kind(exc) == "training" and _peer_gone(exc)) \
            or getattr(exc, "consequence", False)  # e.g. CheckpointSaveError: another rank's
        if consequence and _others_reported(claims, prefix, peer_wait_s):
            show = False  # another rank failed first; this is the consequence
        else:
            key = f"{prefix}-{hashlib.sha1(one_line(exc).encode()).hexdigest()[:16]}"
            claimed = _claim(claims, key)
            show = claimed if claimed is not None else rank == 0
    if show:
        print(line, file=sys.stderr, flush=True)
        if log is None and error_kind(exc) == "training":  # nowhere else to keep it
            traceback.print_exception(exc)
    return EXIT_FAILED
