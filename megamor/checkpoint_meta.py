"""What a checkpoint's megamor.json says about what it can be loaded into, and the one check of it.

Every checkpoint records its identity (`identity`): the model's shape fields, the parallel
layout it was saved with and its tokenizer's fingerprint; weights-only checkpoints
(`megamor convert from-hf`) say `"kind": "weights"` and their vocabulary, and training
checkpoints the engine that saved them. `check_compatible` compares that record with a run's
config and tokenizer, for every use of a checkpoint:

    resume (engine given)    `megamor pretrain --resume` before the ranks start (preflight) and
                             in the ranks, for either engine: not weights-only, saved by the same
                             engine, same shape, same tokenizer
    weights (engine None)    `checkpoint.init_from` (preflight and ranks): same shape, same
                             tokenizer, same (padded) vocabulary where known
    inference                export, eval, depth maps, `megamor generate`: the checkpoint's own
                             config.yaml and tokenizer/ against its record

Each refusal is a CheckpointError naming the checkpoint and what to change. A tokenizer matches
in either of its fingerprint forms (`Tokenizer.matches`: data and checkpoints recorded before the
fingerprint covered only what changes token ids carry the legacy form).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megamor.errors import InputError

META = "megamor.json"
# The fields that decide tensor shapes: a checkpoint can only load into the same values.
SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "kv_channels", "num_recursions", "sharing")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    kind = "checkpoint"


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / META}: cannot read checkpoint metadata: {e}") from None


def identity(model_cfg, tokenizer, layout: dict) -> dict:
    """The keys of megamor.json that `check_compatible` reads: model shape, parallel layout
    (`{"tp", "pp", "dp"}`), tokenizer fingerprint."""
    return {"model": {k: getattr(model_cfg, k) for k in SHAPE_FIELDS}, "layout": dict(layout),
            "tokenizer_fingerprint": tokenizer.fingerprint}


def check_compatible(meta: dict, cfg, tokenizer, engine: Optional[str], *, path: Path,
                     option: Optional[str] = None, padded_vocab: Optional[int] = None,
                     inference: bool = False) -> None:
    """Raise CheckpointError unless the checkpoint at `path` (its megamor.json `meta`) loads
    into a run of `cfg` with `tokenizer` (None: not known yet, not compared).

    `engine`: the engine of a run resuming it (exact resume: weights-only checkpoints and other
    engines' optimizer state refused); None for weights only. `option`: how the user named the
    checkpoint (`checkpoint.init_from=...`), which then starts the messages. `padded_vocab`:
    the run's padded vocabulary, compared where the checkpoint records its own (weights-only
    checkpoints do). `inference`: `tokenizer` is the checkpoint's own (its tokenizer/)."""
    lead = f"{option}: " if option else ""
    if engine is not None:
        _check_resumable(meta, path, engine)
    _check_shape(meta, cfg.model, path, lead)
    saved = meta.get("tokenizer_fingerprint")
    if tokenizer is not None and not tokenizer.matches(saved):
        if inference:
            raise CheckpointError(
                f"{path / META}: saved with tokenizer {saved}, but its tokenizer "
                f"({path / 'tokenizer'}) is {tokenizer.fingerprint}: a tokenizer of another "
                f"checkpoint was copied in")
        if engine is not None:
            raise CheckpointError(f"{path}: saved with tokenizer {saved}, the data now uses "
                                  f"{tokenizer.fingerprint}")
        raise CheckpointError(
            f"{lead}{path / META} was saved with tokenizer {saved}, the data ({cfg.data.path}) "
            f"uses {tokenizer.fingerprint}: tokenize the data with {path / 'tokenizer'} (`megamor "
            f"data prepare INPUTS --out DIR --seq-length {cfg.model.seq_length} --tokenizer "
            f"{path / 'tokenizer'}`) and set data.path=DIR")
    model = meta.get("model", {})
    if padded_vocab is not None and tokenizer is not None:
        vocab = cfg.model.vocab_size or tokenizer.vocab_size
        if model.get("vocab_size", vocab) != vocab or \
                model.get("padded_vocab_size", padded_vocab) != padded_vocab:
            raise CheckpointError(
                f"{lead}{path / META}: vocabulary {model.get('vocab_size')} padded to "
                f"{model.get('padded_vocab_size')} rows, this run has {vocab} padded to "
                f"{padded_vocab} (tensor parallel {cfg.parallel.tensor_model_parallel_size}); set "
                f"model.vocab_size and model.make_vocab_size_divisible_by so that both agree")


def _check_resumable(meta: dict, path: Path, engine: str) -> None:
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


def _check_shape(meta: dict, model_cfg, path: Path, lead: str) -> None:
    saved = meta.get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {getattr(model_cfg, k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != getattr(model_cfg, k)]
    if diffs:
        raise CheckpointError(f"{lead}{path / META}: the model shape differs from the config: "
                              + "; ".join(diffs))
