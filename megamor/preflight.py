"""Checks before any rank starts: everything about a run that can be found wrong from one process.

    check_before_start(cfg, world_size)

runs, in order: the config (`Config.validate`, schedule lengths included), the output
directories (writable, or creatable), the data (every component of `data.path` exists, has a
manifest with a non-empty `train` split of `model.seq_length`, its shard files are there with
the sizes the manifest lists; the tokenizer loads and its fingerprint matches every manifest;
the embedded corpus, `data.path=builtin`, is built and checked by the ranks themselves),
the checkpoint to resume (complete, resumable, same model shape, same tokenizer, schedule
options that `megamor/schedule.py` accepts; `auto` passes over checkpoints with missing or
short files), the checkpoint directory's owner (no other run's checkpoints there, see
megamor/lineage.py), `checkpoint.init_from` (shape and tokenizer), and the free space for
checkpoints (refused below one predicted checkpoint, a warning below two). Checksums of shards
and checkpoint files are not computed here (that would read them whole); the ranks verify them
when they read them.

Used by `megamor pretrain` (before starting ranks) and `python -m megamor.launch.slurm --check` (the
Slurm batch step). Raises ConfigError, DataError, CheckpointError or PreflightError; each message
names the option or file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from megamor.config import Config
from megamor.errors import PreflightError  # noqa: F401 (re-exported)



def checkpoint_root(cfg: Config) -> Path:
    c = cfg.checkpoint
    return Path(c.dir) if c.dir else Path(cfg.run.output_dir) / "checkpoints"


def check_before_start(cfg: Config, world_size: Optional[int]) -> list[str]:
    """Raises on the first problem; returns warnings (one line each) for the caller to print."""
    cfg.validate(world_size=world_size)
    check_engine(cfg)
    check_output_dirs(cfg)
    tokenizer = check_data(cfg)
    resumed = check_resume(cfg, tokenizer)
    from megamor.checkpoint import claim_root  # no other run's checkpoints in the root
    claim_root(checkpoint_root(cfg), resumed, cfg.checkpoint.new_lineage)
    if resumed is None:
        check_init_from(cfg, tokenizer)
    return check_free_space(cfg, tokenizer)


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
    from megamor.tokenizer import TokenizerError, load_tokenizer
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
                                     expect_fingerprint=tok.fingerprints)
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


def check_resume(cfg: Config, tokenizer) -> Optional[Path]:
    """The checkpoint `checkpoint.resume` names (or `auto` finds) can be resumed with `cfg`;
    returns it (None: a fresh start). `auto` passes over checkpoints whose metadata or file
    sizes are wrong, as the ranks will (they also verify checksums and say what they skip)."""
    resume = cfg.checkpoint.resume
    if resume is None:
        return None
    from megamor.checkpoint import check_compatible, pick_checkpoint, quick_problem, read_meta
    from megamor.schedule import plan_resume, saved_schedule

    path = pick_checkpoint(resume, checkpoint_root(cfg), quick_problem)
    if path is None:
        return None  # auto, nothing saved yet: a fresh start
    meta = read_meta(path)
    check_compatible(meta, cfg, tokenizer, cfg.parallel.engine, path=path)
    saved, state = saved_schedule(path, meta)
    plan_resume(saved, state, cfg.train, meta["step"], path)
    return path


def check_init_from(cfg: Config, tokenizer) -> None:
    """`checkpoint.init_from` (used when nothing is resumed): a complete checkpoint of the
    configured shape whose tokenizer is the data's. For the embedded corpus the tokenizer is
    compared once the corpus is built (the ranks compare it otherwise)."""
    init = cfg.checkpoint.init_from
    if not init:
        return
    from megamor.checkpoint import CheckpointError, check_compatible, quick_problem, read_meta

    path = Path(init)
    if not path.exists():
        raise CheckpointError(f"checkpoint.init_from={init}: {path} does not exist")
    if path.is_dir() and not (path / "megamor.json").is_file():
        from megamor.checkpoint import find_latest
        path = find_latest(path) or path  # a checkpoint root: its newest checkpoint
    problem = quick_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint.init_from={init}: {problem}")
    if tokenizer is None and cfg.data.path == "builtin":
        tokenizer = _builtin_tokenizer(cfg)
    check_compatible(read_meta(path), cfg, tokenizer, None, path=path,
                     option=f"checkpoint.init_from={init}")


def _builtin_tokenizer(cfg: Config):
    """The embedded corpus's tokenizer if it is already built, else None."""
    from megamor.data.builtin import builtin_dataset_root
    from megamor.tokenizer import TokenizerError, load_tokenizer

    root = builtin_dataset_root(Path(os.path.expanduser(cfg.data.builtin_root)),
                                cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
    try:
        return load_tokenizer(root / "tokenizer") if (root / "tokenizer").is_dir() else None
    except TokenizerError:
        return None


# ----------------------------------------------------------------------------- free space


def check_free_space(cfg: Config, tokenizer) -> list[str]:
    """Free space at the checkpoint directory against the predicted size of one checkpoint
    (`megamor.planner.checkpoint_bytes`): below one, refuse; below two, warn."""
    from megamor.checkpoint import _human_bytes
    from megamor.planner import checkpoint_bytes

    root = Path(os.path.expanduser(str(checkpoint_root(cfg)))).absolute()
    existing = root
    while not existing.exists():
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return []
    m, t = cfg.model, cfg.train
    vocab = m.vocab_size or (tokenizer.vocab_size if tokenizer is not None
                             else cfg.data.tokenizer_vocab_size)
    step = m.make_vocab_size_divisible_by * cfg.parallel.tensor_model_parallel_size
    padded = -(-vocab // step) * step
    # `auto` is bf16 on a GPU, fp32 on the CPU; this process does not look for a GPU (importing
    # torch costs seconds), so it counts fp32's larger checkpoint unless the device is named.
    precision = t.precision if t.precision != "auto" else ("bf16" if t.device == "cuda" else "fp32")
    need = checkpoint_bytes(cfg, padded, precision)
    what = (f"{root}: {_human_bytes(free)} free, one checkpoint of this run takes about "
            f"{_human_bytes(need)} ({precision}, {cfg.parallel.engine} engine; "
            f"megamor/planner.py checkpoint_bytes)")
    if free < need:
        raise PreflightError("output", f"{what}: free space there, or set checkpoint.dir to a "
                                       f"file system with room")
    if free < 2 * need:
        return [f"{what}: room for one more checkpoint only; a save that runs out of space ends "
                f"the run (the previous checkpoint stays)"]
    return []
