"""Sharded checkpoints: exact resume, resume on another parallel layout, crash-safe publication.

Layout of a checkpoint root (default `<run.output_dir>/checkpoints`):

    step_00000100/          one checkpoint: megatron dist_checkpointing (torch_dist) shards of the
        megamor.json        model and the distributed optimizer (fully reshardable), plus the
        config.yaml         trainer state (step, consumed samples, LR schedule, RNG), the resolved
        tokenizer/          config and the tokenizer; megamor.json is written last
    latest                  name of the newest complete checkpoint (replaced atomically)
    .tmp.step_00000200/     a save in progress; never read

A save writes into `.tmp.<name>`, then renames the directory and replaces `latest`: a checkpoint
is visible only when complete, and a save killed at any point leaves the previous one loadable.
Loading never unpickles arbitrary objects: torch_dist shards and `common.pt` are read by
megatron with torch's `weights_only` loader, the trainer state is JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megamor.errors import InputError
from megamor.lifecycle import EXIT_PREEMPTED  # noqa: F401 (re-exported)

META = "megamor.json"
_NAME = re.compile(r"^step_(\d{8})$")
# The fields that decide tensor shapes: a checkpoint can only load into the same values.
SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "kv_channels", "num_recursions", "sharing")
OPTIMIZER_FORMAT = {
    # The only format that reshards over TP and PP; the memory-efficient variant avoids a path
    # that allocates on the CUDA device.
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    kind = "checkpoint"


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


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META}: cannot read checkpoint metadata: {e}") from None


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


def check_model_shape(meta: dict, model_cfg, path: Path) -> None:
    saved = meta.get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {getattr(model_cfg, k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != getattr(model_cfg, k)]
    if diffs:
        raise CheckpointError(f"{path / META}: the model shape differs from the config: "
                              + "; ".join(diffs))


def check_resumable(meta: dict, path: Path, engine: str = "megatron") -> None:
    """A weights-only checkpoint (`megamor convert from-hf`) has no trainer state to resume, and
    one engine's optimizer state is not the other's."""
    if meta.get("kind") == "weights":
        raise CheckpointError(
            f"{path} is a weights-only checkpoint (no optimizer or trainer state) and cannot be "
            f"resumed; start a run from its weights with checkpoint.init_from={path}")
    saved = meta.get("engine", "megatron")
    if saved != engine:
        raise CheckpointError(
            f"{path} was saved by parallel.engine={saved}, this run uses parallel.engine={engine}: "
            f"resume it with parallel.engine={saved}, or start this engine from its weights with "
            f"checkpoint.init_from={path} (fresh optimizer)")


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
    """Saves and loads the trainer's state; every rank calls `save`/`load` together."""

    def __init__(self, root: Path, keep_last: int, keep_every: int, async_save: bool):
        self.root = root
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._pending = None  # async save in flight: (request queue, finalize)

    # ------------------------------------------------------------------ save

    def save(self, trainer) -> Path:
        from megatron.core import dist_checkpointing
        from megamor.lifecycle import start_checkpoint_helper

        self.wait()  # an asynchronous save still in flight is published first
        start_checkpoint_helper()  # the writer's helper process, immune to stop signals
        name = f"step_{trainer.step:08d}"
        tmp, final = self.root / f".tmp.{name}", self.root / name
        rank = dist.get_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        state = trainer.sharded_state_dict(is_loading=False)
        meta = trainer.checkpoint_meta()

        def publish():
            if dist.get_rank() == 0:
                trainer.tokenizer.save(tmp / "tokenizer")
                from megamor.config import save_config
                save_config(trainer.cfg, tmp / "config.yaml")
                atomic_write(tmp / META, json.dumps(meta, indent=1))
                if final.exists():  # the same step saved again (e.g. end of run after a signal)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write(self.root / "latest", name)
                self._prune()

        if self.async_save:
            from megatron.core.dist_checkpointing.dict_utils import nested_values
            from megatron.core.dist_checkpointing.mapping import ShardedTensor
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            for sh in nested_values(state):
                # The background writer "preloads" tensors to host memory, which on the CPU is
                # no copy: snapshot them, or the next optimizer steps race with the write.
                if isinstance(sh, ShardedTensor) and sh.data.device.type == "cpu":
                    sh.data = sh.data.detach().clone()
            queue = AsyncCallsQueue()
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True,
                                              **_async_strategy_kwargs(dist_checkpointing.save))
            request.add_finalize_fn(publish)
            queue.schedule_async_request(request)
            self._pending = queue
        else:
            dist_checkpointing.save(state, str(tmp))
            trainer.save_engine_state(tmp)
            dist.barrier()
            publish()
            dist.barrier()
        return final

    def poll(self) -> None:
        """Finish an asynchronous save if its writers are done (call once per step)."""
        if self._pending is not None:
            self._pending.maybe_finalize_async_calls(blocking=False)
            if self._pending.get_num_unfinalized_calls() == 0:
                self._pending = None

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.maybe_finalize_async_calls(blocking=True)
            self._pending.close()
            self._pending = None

    def _prune(self) -> None:
        done = sorted((int(m.group(1)), p) for p in self.root.glob("step_*")
                      if (m := _NAME.match(p.name)) and is_complete(p))
        keep = {p for _, p in done[-self.keep_last:]}
        if self.keep_every:
            keep |= {p for s, p in done if s % self.keep_every == 0}
        for _, p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp.step_*"):  # debris of saves that were killed
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, trainer, path: Path) -> dict:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        meta = read_meta(path)
        check_resumable(meta, path, trainer.engine)
        check_model_shape(meta, trainer.cfg.model, path)
        verify_files(path)
        state = trainer.sharded_state_dict(is_loading=True)
        try:
            loaded = dist_checkpointing.load(state, str(path))
        except (Exception, CheckpointException) as e:  # many types; name the checkpoint
            last = [l for l in str(e).splitlines() if l.strip()][-1:] or [""]
            raise CheckpointError(f"{path}: cannot load the sharded state ({type(e).__name__}: "
                                  f"{last[0]}); a shard may be corrupt") from e
        trainer.load_loaded_state(loaded, meta)
        return meta

    def load_weights(self, trainer, path: Path) -> Path:
        """Model weights only (`checkpoint.init_from`), from a weights-only or a training
        checkpoint of any layout; optimizer, LR schedule, step and data position stay fresh."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        path = resolve_resume(str(path), Path(path))
        meta = read_meta(path)
        check_model_shape(meta, trainer.cfg.model, path)
        if meta.get("tokenizer_fingerprint") != trainer.tokenizer.fingerprint:
            raise CheckpointError(
                f"{path / META}: saved with tokenizer {meta.get('tokenizer_fingerprint')}, the "
                f"data uses {trainer.tokenizer.fingerprint}; tokenize the data with "
                f"{path / 'tokenizer'}")
        saved = meta.get("model", {})
        vocab = trainer.cfg.model.vocab_size or trainer.tokenizer.vocab_size
        if saved.get("vocab_size", vocab) != vocab or \
                saved.get("padded_vocab_size", trainer.vocab_size) != trainer.vocab_size:
            raise CheckpointError(
                f"{path / META}: vocabulary {saved.get('vocab_size')} padded to "
                f"{saved.get('padded_vocab_size')} rows, this run has {vocab} padded to "
                f"{trainer.vocab_size} (tensor parallel {trainer.dims.tp}); set model.vocab_size "
                f"and model.make_vocab_size_divisible_by so that both agree")
        verify_files(path)
        try:
            loaded = dist_checkpointing.load(trainer.stage.sharded_state_dict(), str(path))
        except (Exception, CheckpointException) as e:  # many types; name the checkpoint
            last = [l for l in str(e).splitlines() if l.strip()][-1:] or [""]
            raise CheckpointError(f"{path}: cannot load the model weights ({type(e).__name__}: "
                                  f"{last[0]})") from e
        loaded.pop("optimizer", None)  # common (non-sharded) optimizer state comes back too
        trainer.stage.load_state_dict(loaded, strict=True)
        trainer.reload_weights()  # main (fp32) copies follow the new weights
        return path


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
