"""Sharded checkpoints: exact resume, resume on another parallel layout, crash-safe publication.

Layout of a checkpoint root (default `<run.output_dir>/checkpoints`):

    step_00000100/          one checkpoint: megatron dist_checkpointing (torch_dist) shards of the
        megamor.json        model and the distributed optimizer (fully reshardable), plus the
        config.yaml         trainer state (step, consumed samples, LR schedule, RNG), the resolved
        tokenizer/          config and the tokenizer; megamor.json is written last and lists
                            every other file with its size and checksum (megamor/checksums.py)
    latest                  name of the newest complete checkpoint (replaced atomically)
    .tmp.step_00000200/     a save in progress; never read
    previous/<time>/        another run's checkpoints, moved aside by checkpoint.new_lineage=true

A save writes into `.tmp.<name>`, hashes the files, then renames the directory and replaces
`latest`: a checkpoint is visible only when complete, and a save killed or failing at any point
(disk full included: `CheckpointSaveError`, the `.tmp` removed) leaves the previous one loadable.
Resuming verifies the checksums first; `--resume auto` skips a checkpoint that fails (one line
naming the file) and takes the newest intact one (`Checkpointer.select`). Which checkpoints a run
may write next to and delete: megamor/lineage.py.
Loading never unpickles arbitrary objects: torch_dist shards and `common.pt` are read by
megatron with torch's `weights_only` loader, the trainer state is JSON.

What a checkpoint holds comes from the parts that own it (`RunState`, torchtitan's "stateful"
parts): the engine (weights and optimizer state as sharded tensors, its own files, its keys of
megamor.json), the train state (step, LR schedule, RNG, step health, tracking run) and the data
position; each gives its state and takes it back. The checkpointer knows nothing else of a run.
What a checkpoint can be loaded into: megamor/checkpoint_meta.py (`check_compatible`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from megamor.checkpoint_meta import (META, CheckpointError, check_compatible,  # noqa: F401
                                     identity, read_meta)

_NAME = re.compile(r"^step_(\d{8})$")


class Stateful(Protocol):
    """A part of a run whose state a checkpoint keeps in its megamor.json (JSON values; the
    file is flat, each part owns its keys)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, meta: dict, checkpoint: Path) -> None: ...


@dataclass
class RunState:
    """Everything a checkpoint holds, by the part that owns it."""

    engine: Any  # megamor.engines.base.Engine: weights, optimizer state, engine files and keys
    train: Any  # Stateful with `.step` (names the checkpoint): megamor.training.state.TrainState
    data: Stateful  # the data position: megamor.training.data.TrainingData


class CheckpointSaveError(CheckpointError):
    """A save that failed (disk full, I/O error) on this rank or another: the `.tmp` directory
    is removed and the previous checkpoint stays as it was. `consequence`: this rank only
    learned that another rank failed (its line is printed only if no other rank reports)."""

    def __init__(self, message: str, consequence: bool = False):
        super().__init__(message)
        self.consequence = consequence


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


def find_latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root` (the `latest` marker, else a directory scan)."""
    marker = root / "latest"
    if marker.is_file():
        cand = root / marker.read_text().strip()
        if is_complete(cand):
            return cand
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*")
                   if (m := _NAME.match(p.name)) and is_complete(p))
    return steps[-1][1] if steps else None


def resume_candidates(resume: str, root: Path) -> tuple[list[Path], bool]:
    """The checkpoints `checkpoint.resume` may load, in the order to try them, and whether the
    user named one (explicit: no fallback). `auto` (or a checkpoint root given as the path):
    every `step_*` directory of the root, newest first, incomplete ones included (they are
    skipped with a line saying why)."""
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if not (path.is_dir() and not is_complete(path) and any(_steps(path))):
            return [path], True
        root = path  # a checkpoint root was given
    return [p for _, p in sorted(_steps(root), reverse=True)], False


def _steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]


def quick_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint that can be seen without reading its shards (missing
    megamor.json, unreadable metadata, a listed file missing or of another size), or None."""
    from megamor.checksums import check_sizes

    if not is_complete(path):
        return (f"{path / META} is missing (an interrupted save, or not a checkpoint "
                f"directory)")
    try:
        meta = read_meta(path)
        if "files" in meta:
            return check_sizes(path, meta["files"])
        verify_files(path)
    except CheckpointError as e:
        return str(e)
    return None


def full_problem(path: Path) -> Optional[str]:
    """`quick_problem`, then every listed file's checksum, split over the ranks when called by
    all of them together (the same answer on every rank)."""
    from megamor.checksums import agreed_problem

    problem = quick_problem(path)
    if problem is not None:
        return problem
    meta = read_meta(path)
    return agreed_problem(path, meta["files"]) if "files" in meta else None


def previous_hint(path: Path) -> str:
    """How to resume from the checkpoint before `path` in its root (one whose metadata and file
    sizes are in order), for the line that refuses `path`."""
    m = _NAME.match(path.name)
    older = [p for s, p in sorted(_steps(path.parent), reverse=True)
             if m and s < int(m.group(1)) and quick_problem(p) is None]
    if older:
        return (f"resume from the previous checkpoint with `megamor pretrain ... --resume "
                f"{older[0]}` (or --resume auto, which skips checkpoints that fail verification)")
    return "no earlier checkpoint of this run is intact"


def pick_checkpoint(resume: str, root: Path, problem, on_skip=None) -> Optional[Path]:
    """The checkpoint `checkpoint.resume` selects under `root`: the first candidate
    (`resume_candidates`) for which `problem(path)` (`quick_problem` before the ranks start,
    `full_problem` in them) finds nothing. An explicit checkpoint with a problem stops with how
    to resume from the previous one; `auto` tells `on_skip(path, problem)` of each one it passes
    over and stops when none is intact. None: `auto` found no checkpoint (a fresh start)."""
    candidates, explicit = resume_candidates(resume, root)
    first = None
    for cand in candidates:
        found = problem(cand)
        if found is None:
            return cand
        if explicit:
            raise CheckpointError(f"{found}; {previous_hint(cand)}")
        first = first or found
        if on_skip is not None:
            on_skip(cand, found)
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint under {candidates[0].parent} (the newest: {first}): restore "
            f"one, or start a new run with checkpoint.new_lineage=true")
    return None


def claim_root(root: Path, resumed: Optional[Path], new_lineage: bool) -> tuple[Optional[str], list]:
    """The lineage of `resumed` (None: a fresh start) and the other runs' checkpoints under
    `root` (megamor/lineage.py); those stop the run (an output error naming them and the ways
    out) unless `new_lineage` will move them aside."""
    from megamor import lineage
    from megamor.errors import PreflightError

    own = lineage.lineage_of(read_meta(resumed)) if resumed is not None else None
    others = lineage.foreign(root, own)
    if others and not new_lineage:
        raise PreflightError("output", lineage.ownership_error(root, others, resumed))
    return own, others


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir() and not is_complete(path) and find_latest(path) is not None:
        return find_latest(path)  # a checkpoint root was given
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete megamor checkpoint: {path / META} is missing "
            f"(an interrupted save, or not a checkpoint directory)")
    return path


def verify_files(path: Path) -> None:
    """Every shard file the checkpoint's index refers to exists and is long enough."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path / '.metadata'}: unreadable checkpoint index: {e}") from None
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: shard file missing")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f}: truncated shard file ({f.stat().st_size} bytes, the "
                                  f"index needs {size})")


_FULL_ERRNOS = {28: "No space left on device", 122: "Disk quota exceeded"}  # ENOSPC, EDQUOT
# Below this much free space after a failed write, the file system was full: torch's zip writer
# reports a full disk as "unexpected pos ..." without the errno.
_FULL_BELOW_BYTES = 64 * 2**20


def _exceptions(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the per-rank exceptions a torch.distributed.checkpoint
    `CheckpointException` carries (`failures`: rank -> (exception, traceback summary))."""
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [v[0] if isinstance(v, tuple) and v else v for v in failures.values()]
    return [e for e in out if isinstance(e, BaseException)]


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a malformed exception must not hide the real one
        return type(exc).__name__


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def save_failure_cause(exc: BaseException, root: Path) -> tuple[str, bool]:
    """(what went wrong, in one line; whether this rank only learned that another one failed).
    A full disk is named as such: an ENOSPC/EDQUOT anywhere in the chain, or almost no free
    space left on the checkpoint's file system after the failure."""
    from megamor.errors import _PEER_GONE

    chain = _exceptions(exc)
    failures = [e for e in chain if isinstance(getattr(e, "failures", None), dict)]
    # torch's CheckpointException on the ranks other than the coordinator (no details), or a
    # collective broken by the rank that failed and exited
    consequence = (bool(failures) and not any(e.failures for e in failures)) \
        or any(s in _text(e).lower() for e in chain for s in _PEER_GONE)
    # The same words on every rank (the one-line report prints each distinct line once).
    where = f" on the file system of {root}"
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return f"{_FULL_ERRNOS[e.errno]}{where}", consequence
    try:
        if shutil.disk_usage(root).free < _FULL_BELOW_BYTES:
            return f"No space left on device{where}", consequence
    except OSError:
        pass
    if consequence:
        return "another rank failed to write its part of the checkpoint", True
    per_rank = [e for e in chain if e is not exc and not hasattr(e, "failures")]
    inner = next((e for e in chain if isinstance(e, OSError)), per_rank[0] if per_rank else exc)
    lines = [l.strip() for l in _text(inner).splitlines() if l.strip()]
    return f"{type(inner).__name__}: {lines[-1] if lines else ''}".rstrip(": "), False


def _async_strategy_kwargs(save_fn) -> dict:
    """megatron-core >= 0.19 defaults async saves to NVIDIA Resiliency Extension; use it when
    installed, else megatron's own writer (0.16 has only that one and no such argument)."""
    import importlib.util
    import inspect

    if "async_strategy" not in inspect.signature(save_fn).parameters:
        return {}
    has_nvrx = importlib.util.find_spec("nvidia_resiliency_ext") is not None
    return {"async_strategy": "nvrx" if has_nvrx else "mcore"}


class Checkpointer:
    """Saves and loads a run's `RunState`; every rank calls `select`, `save` and `load`
    together. `cfg` and `tokenizer` are saved beside the shards; `layout` ({"tp", "pp", "dp"})
    is recorded with them (`checkpoint_meta.identity`)."""

    def __init__(self, root: Path, keep_last: int, keep_every: int, async_save: bool, *,
                 cfg, tokenizer, layout: dict):
        self.root = root
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.cfg, self.tokenizer, self.layout = cfg, tokenizer, layout
        self._pending = None  # async save in flight: (request queue, tmp dir, final dir)
        self.lineage: Optional[str] = None  # set by `select` (megamor/lineage.py)
        # A failed write is reported once, as a CheckpointSaveError; megatron's writer would also
        # log it on every rank.
        logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async") \
            .setLevel(logging.CRITICAL)

    # ------------------------------------------------------------------ which checkpoint

    def select(self, resume: Optional[str], new_lineage: bool = False) -> Optional[Path]:
        """The checkpoint to resume (None: a fresh start), its files verified against their
        checksums, and the claim on the checkpoint root (megamor/lineage.py): raises if the root
        holds another run's checkpoints, or moves them aside with `new_lineage`.

        `auto` skips, newest first, every checkpoint that is incomplete or fails verification,
        with one line naming the file; an explicit checkpoint that fails stops with one line
        and how to resume from the previous one."""
        from megamor import lineage

        rank0 = dist.get_rank() == 0

        def skipped(cand: Path, problem: str) -> None:
            if rank0:
                print(f"megamor: checkpoint {cand} skipped: {problem}", flush=True)

        path = (pick_checkpoint(resume, self.root, full_problem, skipped)
                if resume is not None else None)
        own, others = claim_root(self.root, path, new_lineage)
        fresh = [lineage.new_id() if rank0 else None]
        dist.broadcast_object_list(fresh, src=0)
        if others and rank0:
            moved = lineage.archive(self.root, others)
            print(f"megamor: checkpoint.new_lineage=true: moved {len(others)} checkpoint(s) of "
                  f"another run to {moved}", flush=True)
        dist.barrier()
        self.lineage = own if own is not None else fresh[0]
        return path

    # ------------------------------------------------------------------ save

    def save(self, state: RunState) -> Path:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
        from megamor.lifecycle import start_checkpoint_helper

        self.wait()  # an asynchronous save still in flight is published first
        start_checkpoint_helper()  # the writer's helper process, immune to stop signals
        name = f"step_{state.train.step:08d}"
        tmp, final = self.root / f".tmp.{name}", self.root / name
        try:
            if dist.get_rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            dist.barrier()
            shards = state.engine.sharded_state_dict(is_loading=False)
            meta = self._meta(state)

            def publish():
                self._publish(meta, tmp, final)

            if self.async_save:
                from megatron.core.dist_checkpointing.dict_utils import nested_values
                from megatron.core.dist_checkpointing.mapping import ShardedTensor
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
                for sh in nested_values(shards):
                    # The background writer "preloads" tensors to host memory, which on the CPU
                    # is no copy: snapshot them, or the next optimizer steps race with the write.
                    if isinstance(sh, ShardedTensor) and sh.data.device.type == "cpu":
                        sh.data = sh.data.detach().clone()
                queue = AsyncCallsQueue()
                request = dist_checkpointing.save(shards, str(tmp), async_sharded_save=True,
                                                  **_async_strategy_kwargs(dist_checkpointing.save))
                request.add_finalize_fn(publish)
                queue.schedule_async_request(request)
                self._pending = (queue, tmp, final)
            else:
                dist_checkpointing.save(shards, str(tmp))
                state.engine.save_files(tmp)
                publish()
        except (Exception, CheckpointException) as e:
            raise self._failed(e, tmp, final) from e
        return final

    def _meta(self, state: RunState) -> dict:
        """megamor.json's content (without the file list): the checkpoint's identity and each
        part's keys."""
        meta = {"format": 1, "saved_at": now(),
                **identity(self.cfg.model, self.tokenizer, self.layout)}
        for part in (state.engine.checkpoint_meta(), state.train.state_dict(),
                     state.data.state_dict()):
            clash = set(part) & set(meta)
            if clash:
                raise ValueError(f"megamor.json keys written by two parts: {sorted(clash)}")
            meta.update(part)
        meta["lineage"] = self.lineage
        return meta

    def _publish(self, meta: dict, tmp: Path, final: Path) -> None:
        """Every rank: the shards are written. Rank 0 adds tokenizer and config, the ranks hash
        the files (megamor/checksums.py), rank 0 writes megamor.json, renames `.tmp.<name>` to
        `<name>`, replaces `latest` and rotates."""
        from megamor.checksums import ALGORITHM, gather_entries

        rank0 = dist.get_rank() == 0
        dist.barrier()
        if rank0:
            self.tokenizer.save(tmp / "tokenizer")
            from megamor.config import save_config
            save_config(self.cfg, tmp / "config.yaml")
        dist.barrier()
        entries = gather_entries(tmp)
        if rank0:
            meta["checksum"], meta["files"] = ALGORITHM, entries
            atomic_write(tmp / META, json.dumps(meta, indent=1))
            old = None
            if final.exists():  # the same step saved again (e.g. end of run after a signal)
                old = final.with_name(f".old.{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", final.name)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune(final)
        dist.barrier()

    def _failed(self, exc: BaseException, tmp: Path, final: Path) -> CheckpointSaveError:
        """The one-line error of a failed save; rank 0 removes the half-written directory."""
        cause, consequence = save_failure_cause(exc, self.root)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = self.last_saved()
        prev = (f"the previous checkpoint {last} is intact (resume with --resume auto once "
                f"there is room)" if last else "no earlier checkpoint of this run exists")
        return CheckpointSaveError(f"saving {final} failed: {cause}; removed {tmp}; {prev}",
                                   consequence=consequence)

    def poll(self) -> None:
        """Finish an asynchronous save if its writers are done (call once per step)."""
        if self._pending is not None:
            queue = self._pending[0]
            self._finalize(lambda: queue.maybe_finalize_async_calls(blocking=False))
            if self._pending is not None and queue.get_num_unfinalized_calls() == 0:
                self._pending = None

    def wait(self) -> None:
        if self._pending is not None:
            queue = self._pending[0]
            self._finalize(lambda: queue.maybe_finalize_async_calls(blocking=True))
            queue.close()
            self._pending = None

    def _finalize(self, fn) -> None:
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
        try:
            fn()
        except (Exception, CheckpointException) as e:
            _, tmp, final = self._pending
            self._pending = None  # the request failed on every rank; nothing left to finish
            raise self._failed(e, tmp, final) from e

    def last_saved(self) -> Optional[Path]:
        """This run's newest complete checkpoint (for messages), or None."""
        from megamor import lineage
        own = [p for _, p in lineage.complete_checkpoints(self.root)
               if lineage.read_lineage(p) == (self.lineage or "")]
        return own[-1] if own else None

    def _prune(self, just_saved: Path) -> None:
        from megamor.lineage import to_delete
        for p in to_delete(self.root, self.lineage or "", self.keep_last, self.keep_every,
                           just_saved):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp.step_*"):  # debris of saves that were killed
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, path: Path, state: RunState) -> dict:
        """An exact resume from `path` (chosen by `select`): the engine restores weights and
        optimizer state, then the train state and data position take their keys of
        megamor.json. Returns megamor.json's content."""
        meta = read_meta(path)
        check_compatible(meta, self.cfg, self.tokenizer, state.engine.name, path=path)
        state.engine.load(path, meta, partial(self.read_shards, path))
        state.train.load_state_dict(meta, path)
        state.data.load_state_dict(meta, path)
        return meta

    def read_shards(self, path: Path, template: dict) -> dict:
        """The sharded state of checkpoint `path` into `template` (a sharded state dict)."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        verify_files(path)
        try:
            return dist_checkpointing.load(template, str(path))
        except (Exception, CheckpointException) as e:  # many types; name the checkpoint
            last = [l for l in str(e).splitlines() if l.strip()][-1:] or [""]
            raise CheckpointError(f"{path}: cannot load the sharded state ({type(e).__name__}: "
                                  f"{last[0]}); a shard may be corrupt") from e

    def load_weights(self, given: str | Path, stage: torch.nn.Module, padded_vocab: int) -> Path:
        """Model weights only (`checkpoint.init_from=given`: a checkpoint, or a root whose newest
        one is taken), from a weights-only or a training checkpoint of any layout, into this
        rank's `stage`; optimizer, LR schedule, step and data position stay fresh. Returns the
        checkpoint loaded."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        path = resolve_resume(str(given), Path(given))
        meta = read_meta(path)
        option = f"checkpoint.init_from={given}"
        check_compatible(meta, self.cfg, self.tokenizer, None, path=path, option=option,
                         padded_vocab=padded_vocab)
        problem = full_problem(path)
        if problem is not None:
            raise CheckpointError(f"{option}: {problem}")
        try:
            loaded = dist_checkpointing.load(stage.sharded_state_dict(), str(path))
        except (Exception, CheckpointException) as e:  # many types; name the checkpoint
            last = [l for l in str(e).splitlines() if l.strip()][-1:] or [""]
            raise CheckpointError(f"{path}: cannot load the model weights ({type(e).__name__}: "
                                  f"{last[0]})") from e
        loaded.pop("optimizer", None)  # common (non-sharded) optimizer state comes back too
        stage.load_state_dict(loaded, strict=True)
        return path


def verify_checkpoint(path: Path) -> str:
    """Check one checkpoint in this process (every file against its size and checksum); returns
    a one-line summary, raises CheckpointError naming the first bad file."""
    problem = full_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    meta = read_meta(path)
    files = meta.get("files")
    if files is None:
        return (f"{path}: ok by size only: saved before checkpoints recorded checksums (shard "
                f"sizes match the index)")
    total = sum(size for size, _ in files.values())
    return (f"{path}: ok: {len(files)} files, {_human_bytes(total)}, every "
            f"{meta.get('checksum', 'xxh3_128')} checksum matches")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, unsharded, by its checkpoint key, in one process with no
    distributed setup (for comparisons and conversion)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    out = {k: torch.empty(v.size, dtype=v.properties.dtype)
           for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
    dcp.load(out, storage_reader=reader, no_dist=True)
    return out


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
