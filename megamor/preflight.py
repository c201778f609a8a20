"""Checks before any rank starts: everything about a run that can be found wrong from one process.

    check_before_start(cfg, world_size)

runs, in order: the config (`Config.validate`, schedule lengths included), the output
directories (writable, or creatable), the data (every component of `data.path` exists, has a
manifest with a non-empty `train` split of `model.seq_length`, its shard files are there with
the sizes the manifest lists; the tokenizer loads and its fingerprint matches every manifest;
the embedded corpus, `data.path=builtin`, is built and checked by the ranks themselves),
and the checkpoint to resume (complete, resumable, same model shape, same tokenizer, schedule
options that `megamor/schedule.py` accepts). Checksums of shards are not computed here (that
would read the whole dataset); the ranks verify each shard when they first read it.

Used by `megamor pretrain` (before starting ranks) and `python -m launch.slurm --check` (the
Slurm batch step). Raises ConfigError, DataError, CheckpointError or PreflightError; each message
names the option or file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from megamor.config import Config
from megamor.errors import InputError


class PreflightError(InputError, RuntimeError):
    """A run that cannot start; `kind` is the error line's kind (`output`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def checkpoint_root(cfg: Config) -> Path:
    c = cfg.checkpoint
    return Path(c.dir) if c.dir else Path(cfg.run.output_dir) / "checkpoints"


def check_before_start(cfg: Config, world_size: Optional[int]) -> None:
    cfg.validate(world_size=world_size)
    check_engine(cfg)
    check_output_dirs(cfg)
    tokenizer = check_data(cfg)
    check_resume(cfg, tokenizer)


def check_engine(cfg: Config) -> None:
    import importlib.util
    if cfg.parallel.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise PreflightError("config", "parallel.engine=deepspeed needs DeepSpeed: pip install "
                                       "'megamor[deepspeed]' (or use parallel.engine=megatron)")


# ----------------------------------------------------------------------------- output


def check_writable(path: Path, option: str) -> None:
    """`path` is a writable directory, or can be created as one."""
    p = Path(os.path.expanduser(str(path))).absolute()
    if p.exists():
        if not p.is_dir():
            raise PreflightError("output", f"{option}={path}: {p} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise PreflightError("output", f"{option}={path}: {p} is not writable by this user")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError("output", f"{option}={path}: cannot create {p}: {parent} is not a "
                                       f"writable directory")


def check_output_dirs(cfg: Config) -> None:
    check_writable(Path(cfg.run.output_dir), "run.output_dir")
    if cfg.checkpoint.dir:
        check_writable(Path(cfg.checkpoint.dir), "checkpoint.dir")
    if cfg.data.path == "builtin":
        check_writable(Path(cfg.data.builtin_root), "data.builtin_root")


# ----------------------------------------------------------------------------- data


def check_data(cfg: Config):
    """The tokenizer the run will use; None for the embedded corpus (`data.path=builtin`), which
    the ranks build and check themselves (this also keeps torch out of the launching process in
    the quickstart: importing it costs seconds)."""
    if cfg.data.path == "builtin":
        return None
    from tokenizer import TokenizerError, load_tokenizer
    from megamor.data import DataError, ShardedTokenDataset, parse_data_spec

    spec, option = cfg.data.path, "data.path"
    comps = parse_data_spec(spec)
    for c in comps:
        if not c.path.exists():
            raise DataError(f"{option}={spec}: {c.path} does not exist")
        if not c.path.is_dir():
            raise DataError(f"{option}={spec}: {c.path} is not a directory (a prepared dataset "
                            f"is a directory with manifest.json; `megamor data prepare` makes one)")
        if not (c.path / "manifest.json").is_file():
            raise DataError(f"{option}={spec}: {c.path} has no manifest.json: not a prepared "
                            f"dataset (`megamor data prepare INPUTS --out {c.path}` makes one)")
    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else comps[0].path / "tokenizer"
    try:
        tok = load_tokenizer(tok_path)
    except TokenizerError as e:
        where = "data.tokenizer" if cfg.data.tokenizer else f"the tokenizer of {option}"
        raise DataError(f"{where} ({tok_path}): {e}") from None
    for c in comps:
        try:
            ds = ShardedTokenDataset(c.path, "train", expect_seq_length=cfg.model.seq_length,
                                     expect_fingerprint=tok.fingerprint)
        except DataError as e:
            if "seq_length mismatch" in str(e):
                raise DataError(f"{e} (model.seq_length={cfg.model.seq_length}; prepare the data "
                                f"with --seq-length {cfg.model.seq_length} or set "
                                f"model.seq_length={_manifest_seq_length(c.path)})") from None
            if "fingerprint mismatch" in str(e):
                raise DataError(f"{e} (the tokenizer {tok_path}; the data was prepared with "
                                f"another one)") from None
            raise
        if len(ds) == 0:
            raise DataError(f"{ds.manifest.path}: split 'train' has no samples")
        if cfg.data.on_corrupt == "error":
            for sh in ds.info.shards:
                f = c.path / sh.file
                if not f.is_file():
                    raise DataError(f"shard missing: {f} (listed in {ds.manifest.path})")
                if f.stat().st_size != sh.num_bytes:
                    raise DataError(f"shard {f}: size {f.stat().st_size} bytes, manifest says "
                                    f"{sh.num_bytes} (truncated or rewritten?)")
    return tok


def _manifest_seq_length(path: Path) -> int:
    from megamor.data import load_manifest
    return load_manifest(path).seq_length


# ----------------------------------------------------------------------------- resume


def check_resume(cfg: Config, tokenizer) -> None:
    """The checkpoint `checkpoint.resume` names (or `auto` finds) can be resumed with `cfg`."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return
    root = checkpoint_root(cfg) if resume == "auto" else Path(resume)
    if resume == "auto" and not any(root.glob("step_*")):
        return  # nothing saved yet: a fresh start
    from megamor.checkpoint import (CheckpointError, check_model_shape, check_resumable,
                                    read_meta, resolve_resume, verify_files)
    from megamor.schedule import plan_resume, saved_schedule

    path = resolve_resume(resume, root)
    if path is None:
        return  # auto, nothing saved yet: a fresh start
    meta = read_meta(path)
    check_resumable(meta, path, cfg.parallel.engine)
    check_model_shape(meta, cfg.model, path)
    if tokenizer is not None and meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise CheckpointError(
            f"{path}: saved with tokenizer {meta.get('tokenizer_fingerprint')}, the data now "
            f"uses {tokenizer.fingerprint}")
    verify_files(path)
    saved, state = saved_schedule(path, meta)
    plan_resume(saved, state, cfg.train, meta["step"], path)
