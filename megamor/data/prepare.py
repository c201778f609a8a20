"""``megamor data prepare``: raw text -> tokenized, packed webdataset shards + manifest.

Pipeline: the main process reads the inputs in order and cuts them into chunks
(``megamor.data.sources``); worker processes decode, check, hash and tokenize
each chunk; results come back in input order (a bounded window of chunks in
flight), are routed to the train or validation split and packed by
``PackedSplitWriter`` into shards as they fill. The output is a deterministic
function of (input bytes, options, tokenizer): the same for any number of
workers, and a re-run on unchanged input is a no-op (checked through the
manifest's ``prepare.fingerprint`` and each shard's sha256).

Validation split: a document goes to ``val`` when a keyed hash of its text
(``blake2b``, key = ``seed``) falls below ``val_fraction``; so the split does not
depend on document order, and exact duplicates always land on the same side.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from megamor.data.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    DataError,
    Manifest,
    load_manifest,
)
from megamor.data.shard_writer import (
    PackedSplitWriter,
    check_compatible,
    commit_manifest,
    invalidate_splits,
    split_is_current,
)
from megamor.data.sources import (
    TXT_MODES,
    Chunk,
    Counts,
    decode_chunk,
    is_validation_doc,
    iter_chunks,
    resolve_inputs,
)

TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------- worker side

_W: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, text_field: str, val_fraction: float, seed: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    _W["hf"] = HFTokenizer.from_str(tokenizer_json)
    _W["text_field"] = text_field
    _W["val_fraction"] = val_fraction
    _W["seed"] = seed


def _is_val(text: str) -> bool:
    return is_validation_doc(text, _W["val_fraction"], _W["seed"])


@dataclass
class ChunkResult:
    tokens: np.ndarray  # int32, the chunk's documents concatenated (no EOS)
    lengths: np.ndarray  # int64 per document
    is_val: np.ndarray  # bool per document
    counts: Counts
    nbytes: int


def _process(chunk: Chunk) -> ChunkResult:
    texts, counts = decode_chunk(chunk, _W["text_field"])
    encs = _W["hf"].encode_batch(texts, add_special_tokens=False) if texts else []
    lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    tokens = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32,
                         count=int(lengths.sum()))
    if chunk.split is not None:
        is_val = np.full(len(texts), chunk.split == "val", dtype=bool)
    else:
        is_val = np.fromiter((_is_val(t) for t in texts), dtype=bool, count=len(texts))
    return ChunkResult(tokens, lengths, is_val, counts, chunk.nbytes)


def _ordered(fn: Callable, items: Iterable, workers: int, initargs: tuple) -> Iterator[ChunkResult]:
    """``map(fn, items)`` in order, on ``workers`` processes with a bounded window in flight."""
    if workers <= 0:
        _init_worker(*initargs)
        yield from map(fn, items)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # One tokenizer thread per worker: the workers are the parallelism (and no fork warning).
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    with pool:
        window: deque = deque()
        for item in items:
            window.append(pool.apply_async(fn, (item,)))
            if len(window) >= 3 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


# ----------------------------------------------------------------------------- progress


class _Progress:
    """tqdm when installed, else a one-line bar on stderr; counts input bytes."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled, self.total, self.done, self.tokens = enabled, total, 0, 0
        self.t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc="prepare", file=sys.stderr, mininterval=0.5)
            except ImportError:
                pass

    def update(self, nbytes: int, tokens: int) -> None:
        self.done += nbytes
        self.tokens += tokens
        if not self.enabled:
            return
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
        elif time.perf_counter() - self._last > 0.5:
            self._last = time.perf_counter()
            frac = min(self.done / self.total, 1.0) if self.total else 0.0
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\rprepare [{bar:<30}] {100 * frac:5.1f}% {self.tokens:,} tok "
                             f"{rate:,.0f} tok/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- driver


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: Manifest
    up_to_date: bool  # nothing was rewritten
    counts: Counts = field(default_factory=Counts)
    seconds: float = 0.0
    workers: int = 0
    tokens: int = 0  # tokenized (document tokens, without EOS)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.tokens_per_s / max(self.workers, 1)

    def summary(self) -> str:
        m = self.manifest
        if self.up_to_date:
            head = f"{self.out_dir}: up to date (inputs and options unchanged; shards verified)"
        else:
            head = (f"{self.out_dir}: {self.tokens:,} tokens in {self.seconds:.1f} s with "
                    f"{self.workers or 1} worker(s): {self.tokens_per_s:,.0f} tok/s "
                    f"({self.tokens_per_s_per_worker:,.0f} per worker)")
        lines = [head]
        for name, s in sorted(m.splits.items()):
            lines.append(f"  {name}: {s.num_samples:,} samples of {m.seq_length}+1 tokens in "
                         f"{len(s.shards)} shard(s); {s.num_tokens:,} stream tokens")
        c = (m.prepare or {}).get("counts", {})
        if c:
            lines.append(
                f"  inputs: {c['files']} file(s), {c['input_bytes']:,} bytes; documents: "
                f"{c['documents']:,} kept, {c['empty_documents']} empty (skipped), "
                f"{c['non_utf8_documents']} with non-UTF-8 bytes (replaced), "
                f"{c['bad_json_lines']} bad JSON lines (skipped), {c['empty_files']} empty file(s), "
                f"{c['ignored_files']} unsupported file(s) ignored")
            for e in c.get("examples", []):
                lines.append(f"    {e}")
        val = m.splits.get("val")
        if val is not None and val.num_samples == 0:
            lines.append("  warning: the validation split has no samples (raise --val-fraction)")
        return "\n".join(lines)


def _fingerprint(input_hashes: list[dict], options: dict, tokenizer_fp: str) -> str:
    blob = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "inputs": input_hashes,
                       "options": options, "tokenizer": tokenizer_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    from megamor.tokenizer import TokenizerError, load_tokenizer
    dest = out / TOKENIZER_DIR
    try:
        if load_tokenizer(dest).fingerprint == tokenizer.fingerprint:
            return
    except TokenizerError:
        pass
    tokenizer.save(dest)


def prepare_dataset(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_length: int,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 256,
    val_fraction: float = 0.01,
    text_field: str = "text",
    txt_mode: str = "file",
    hf_split: str = "train",
    keep_boundaries: bool = False,
    seed: int = 0,
    workers: int = 0,
    force: bool = False,
    progress: bool | None = None,
    chunk_bytes: int = 1 << 20,
) -> PrepareResult:
    """Prepare ``train`` (and ``val`` when ``val_fraction > 0`` or the input fixes it) splits.

    ``tokenizer`` is a ``tokenizer.Tokenizer``; it is copied to ``out_dir/tokenizer``.
    ``workers=0`` tokenizes in this process; ``progress=None`` shows a bar when stderr is a
    terminal. Errors (``DataError``) name the input file and what is wrong with it.
    """
    if seq_length < 1 or samples_per_shard < 1:
        raise ValueError("seq_length and samples_per_shard must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={txt_mode!r}: must be one of {TXT_MODES}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE

    counts = Counts()
    resolved = resolve_inputs(inputs, counts)
    input_hashes = [{"path": i.path, "kind": i.kind, "compression": i.compression,
                     "sha256": i.content_sha256()} for i in resolved]
    options = {"seq_length": seq_length, "samples_per_shard": samples_per_shard,
               "val_fraction": val_fraction, "text_field": text_field, "txt_mode": txt_mode,
               "hf_split": hf_split, "keep_boundaries": keep_boundaries, "seed": seed}
    # Every fingerprint the tokenizer answers to (data prepared before the tokenizer
    # fingerprint covered only what changes token ids carries the legacy form): still current.
    tok_fps = getattr(tokenizer, "fingerprints", (tokenizer.fingerprint,))
    inputs = [{k: v for k, v in h.items() if k != "path"} for h in input_hashes]
    fps = [_fingerprint(inputs, options, t) for t in tok_fps]
    fp = fps[0]

    existing = load_manifest(manifest_path) if manifest_path.exists() else None
    check_compatible(existing, SPLITS, tok_fps, seq_length, manifest_path)
    prior = existing.prepare.get("fingerprint") if existing and existing.prepare else None
    if (not force and prior in fps
            and all(split_is_current(out, existing, s, prior, tok_fps, seq_length,
                                     samples_per_shard, keep_boundaries)
                    for s in SPLITS if s in existing.prepare.get("splits", ["train"]))):
        _save_tokenizer(tokenizer, out)
        return PrepareResult(out, existing, True, counts, time.perf_counter() - t0, workers)

    invalidate_splits(out, SPLITS)
    existing = load_manifest(manifest_path) if manifest_path.exists() else None
    _save_tokenizer(tokenizer, out)
    writers = {s: PackedSplitWriter(out, s, seq_length, samples_per_shard, tokenizer.eos_id,
                                    keep_boundaries) for s in SPLITS}
    chunks = iter_chunks(resolved, text_field=text_field, txt_mode=txt_mode, hf_split=hf_split,
                         chunk_bytes=chunk_bytes, counts=counts)
    total_bytes = sum(i.size() for i in resolved)
    bar = _Progress(total_bytes, sys.stderr.isatty() if progress is None else progress)
    initargs = (tokenizer.hf.to_str(), text_field, val_fraction, seed)
    ntok = 0
    doc_counts = Counts()  # kept apart from the reader's: the reader runs ahead of the results
    try:
        for res in _ordered(_process, chunks, workers, initargs):
            doc_counts.add(res.counts)
            ntok += len(res.tokens)
            if res.is_val.any():
                tok_val = np.repeat(res.is_val, res.lengths)
                writers["val"].add_documents(res.tokens[tok_val], res.lengths[res.is_val])
                writers["train"].add_documents(res.tokens[~tok_val], res.lengths[~res.is_val])
            else:
                writers["train"].add_documents(res.tokens, res.lengths)
            bar.update(res.nbytes, len(res.tokens))
    finally:
        bar.close()
    counts.add(doc_counts)
    if counts.documents == 0:
        raise DataError(f"no documents in the inputs {[str(i) for i in inputs]} "
                        f"({counts.empty_documents} empty, {counts.bad_json_lines} bad JSON lines)")
    keep = [s for s in SPLITS if s == "train" or val_fraction > 0 or writers[s].num_docs > 0]
    infos = {s: writers[s].finish(source_sha256=fp) for s in keep}
    prepare = {"fingerprint": fp, "inputs": input_hashes, "options": options,
               "counts": counts.to_json(), "splits": keep, "tokenizer": TOKENIZER_DIR}
    manifest = commit_manifest(out, existing, infos, tokenizer, seq_length, prepare=prepare)
    for s in SPLITS:
        if s in keep:
            writers[s].remove_stale()
        else:
            writers[s].shards = []
            writers[s].remove_stale()
            try:
                (out / s).rmdir()
            except OSError:
                pass
    return PrepareResult(out, manifest, False, counts, time.perf_counter() - t0, workers, ntok)
