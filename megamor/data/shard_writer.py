"""Writing packed-token shards: ``PackedSplitWriter`` and the manifest updates around it.

``megamor data prepare`` (``megamor.data.prepare``) streams tokenized documents into one
writer per split; each shard is written atomically with deterministic bytes as soon as it
is full, and the manifest (``megamor.data.manifest``) is committed last.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import webdataset as wds

from megamor.data.manifest import (
    DOCSTARTS_EXT,
    MANIFEST_FILE,
    SAMPLE_EXT,
    SHARD_PATTERN,
    SHARD_RE,
    DataError,
    accepted_fingerprints,
    Manifest,
    ShardInfo,
    SplitInfo,
    atomic_write_bytes,
    load_manifest,
    sha256_file,
    write_manifest,
)


class TokenizerLike(Protocol):
    """What ``commit_manifest`` needs from a tokenizer (``tokenizer.Tokenizer`` fits)."""

    eos_id: int
    fingerprint: str

    @property
    def vocab_size(self) -> int: ...


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype="<i4"), allow_pickle=False)
    return buf.getvalue()


def _shard_bytes(samples: Sequence[np.ndarray], first_index: int,
                 doc_starts: Sequence[np.ndarray] | None = None) -> bytes:
    """One tar shard with fixed metadata (byte-identical on re-runs)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="megamor", group="megamor",
                       mode=0o444) as tw:
        for k, sample in enumerate(samples):
            obj = {"__key__": "%09d" % (first_index + k), SAMPLE_EXT: _npy_bytes(sample)}
            if doc_starts is not None:
                obj[DOCSTARTS_EXT] = _npy_bytes(doc_starts[k])
            tw.write(obj)
    return buf.getvalue()


def _check_split_name(split_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split_name) or split_name in (".", ".."):
        raise ValueError(f"invalid split name {split_name!r}")


class PackedSplitWriter:
    """Streaming packer + shard writer for one split (constant memory in the corpus size).

    Documents arrive in order (``add_documents``); each is followed by EOS in the
    stream, and sample ``i`` is ``stream[i*S : i*S + S + 1]`` (``megamor.data.manifest``).
    A shard is written (atomically, deterministic bytes) as soon as it is full;
    ``finish`` writes the last partial one and returns the split's ``SplitInfo``.
    With ``keep_boundaries`` every sample also gets a ``docstarts.npy`` member: the
    positions ``p`` in ``[0, S]`` where a document begins (its first token; an empty
    document's EOS).
    """

    def __init__(self, out_dir: str | Path, split_name: str, seq_length: int, samples_per_shard: int,
                 eos_id: int, keep_boundaries: bool = False) -> None:
        if seq_length < 1 or samples_per_shard < 1:
            raise ValueError("seq_length and samples_per_shard must be >= 1")
        _check_split_name(split_name)
        self.out = Path(out_dir)
        self.split = split_name
        self.seq_length = seq_length
        self.samples_per_shard = samples_per_shard
        self.eos_id = eos_id
        self.keep_boundaries = keep_boundaries
        (self.out / split_name).mkdir(parents=True, exist_ok=True)
        self.num_tokens = 0  # stream tokens so far, EOS included
        self.num_docs = 0
        self.num_samples = 0
        self.shards: list[ShardInfo] = []
        self._pending = np.zeros(0, dtype=np.int32)  # stream[_pending_start:]
        self._pending_start = 0
        self._starts = np.zeros(0, dtype=np.int64)  # absolute doc starts >= _pending_start
        self._rows: list[np.ndarray] = []  # samples of the shard being filled
        self._row_starts: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """Append documents given as one concatenated token array and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return
        tokens = np.asarray(tokens, dtype=np.int32)
        ends = np.cumsum(lengths)
        if ends[-1] != len(tokens):
            raise ValueError(f"lengths sum to {int(ends[-1])}, tokens has {len(tokens)}")
        with_eos = np.insert(tokens, ends, np.int32(self.eos_id))
        if self.keep_boundaries:
            rel = np.concatenate([[0], ends[:-1]]) + np.arange(len(lengths))
            self._starts = np.concatenate([self._starts, rel + self.num_tokens])
        self.num_tokens += len(with_eos)
        self.num_docs += len(lengths)
        self._pending = np.concatenate([self._pending, with_eos])
        self._drain()

    def _drain(self) -> None:
        S = self.seq_length
        n = (len(self._pending) - 1) // S
        if n <= 0:
            return
        rows = np.lib.stride_tricks.as_strided(
            self._pending, shape=(n, S + 1),
            strides=(self._pending.strides[0] * S, self._pending.strides[0]), writeable=False)
        for i in range(n):
            self._rows.append(rows[i])
            if self.keep_boundaries:
                a = self._pending_start + i * S
                lo = np.searchsorted(self._starts, a, side="left")
                hi = np.searchsorted(self._starts, a + S, side="right")
                self._row_starts.append((self._starts[lo:hi] - a).astype(np.int32))
            if len(self._rows) == self.samples_per_shard:
                self._flush()
        self._pending = self._pending[n * S:].copy()
        self._pending_start += n * S
        if self.keep_boundaries:
            self._starts = self._starts[np.searchsorted(self._starts, self._pending_start):]

    def _flush(self) -> None:
        if not self._rows:
            return
        j = len(self.shards)
        rel = f"{self.split}/{SHARD_PATTERN % j}"
        data = _shard_bytes(self._rows, self.num_samples,
                            self._row_starts if self.keep_boundaries else None)
        atomic_write_bytes(self.out / rel, data)
        self.shards.append(ShardInfo(file=rel, num_samples=len(self._rows), num_bytes=len(data),
                                     sha256=hashlib.sha256(data).hexdigest()))
        self.num_samples += len(self._rows)
        self._rows, self._row_starts = [], []

    def finish(self, source_sha256: str) -> SplitInfo:
        """Write the last shard (the trailing partial sample is dropped) and describe the split."""
        self._flush()
        return SplitInfo(samples_per_shard=self.samples_per_shard, num_samples=self.num_samples,
                         num_tokens=int(self.num_tokens), source_sha256=source_sha256,
                         shards=tuple(self.shards), doc_starts=self.keep_boundaries)

    def remove_stale(self) -> None:
        """Delete shard files of this split that the new preparation does not list."""
        keep = {Path(sh.file).name for sh in self.shards}
        for f in (self.out / self.split).iterdir():
            if SHARD_RE.match(f.name) and f.name not in keep:
                f.unlink()


def invalidate_splits(out_dir: str | Path, splits: Sequence[str]) -> Manifest | None:
    """Drop ``splits`` from ``out_dir``'s manifest before their shards are rewritten.

    A preparation interrupted later then leaves a manifest that does not list the
    half-written split (a clear 'no split' error) instead of one whose checksums fail.
    Returns the manifest as it was (``None`` when there was none).
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    m = load_manifest(path)
    if any(s in m.splits for s in splits):
        kept = {k: v for k, v in m.splits.items() if k not in splits}
        if kept:
            write_manifest(path, Manifest(
                tokenizer_fingerprint=m.tokenizer_fingerprint, vocab_size=m.vocab_size,
                eos_id=m.eos_id, seq_length=m.seq_length, splits=kept, dtype=m.dtype,
                prepare=m.prepare))
        else:
            path.unlink()
    return m


def check_compatible(existing: Manifest | None, replacing: Sequence[str],
                     fingerprint: str | Sequence[str],
                     seq_length: int, manifest_path: Path) -> None:
    """Splits kept beside new ones must share their tokenizer and sequence length."""
    if existing is None:
        return
    others = set(existing.splits) - set(replacing)
    if others and (existing.tokenizer_fingerprint not in accepted_fingerprints(fingerprint)
                   or existing.seq_length != seq_length):
        raise DataError(
            f"{manifest_path}: existing splits {sorted(others)} use tokenizer "
            f"{existing.tokenizer_fingerprint[:12]}/seq_length={existing.seq_length}, "
            f"cannot add split(s) {sorted(replacing)} with "
            f"{accepted_fingerprints(fingerprint)[0][:12]}/"
            f"seq_length={seq_length}; use a fresh out_dir")


def commit_manifest(out_dir: str | Path, existing: Manifest | None, new_splits: dict[str, SplitInfo],
                    tokenizer: TokenizerLike, seq_length: int,
                    prepare: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest: ``existing``'s other splits plus ``new_splits`` (written last, atomically)."""
    path = Path(out_dir) / MANIFEST_FILE
    splits = {k: v for k, v in existing.splits.items() if k not in new_splits} if existing else {}
    splits.update(new_splits)
    if prepare is None and existing is not None:
        prepare = existing.prepare
    manifest = Manifest(tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                        eos_id=tokenizer.eos_id, seq_length=seq_length, splits=splits,
                        path=path, prepare=prepare)
    write_manifest(path, manifest)
    return manifest


def split_is_current(out: Path, m: Manifest, split: str, src: str,
                     fingerprint: str | Sequence[str],
                     seq_length: int, samples_per_shard: int, keep_boundaries: bool = False) -> bool:
    """True when ``split`` of manifest ``m`` was made from the same input and settings and all
    its shards are intact (size and sha256)."""
    s = m.splits.get(split)
    if s is None or s.source_sha256 != src or s.samples_per_shard != samples_per_shard:
        return False
    if s.doc_starts != keep_boundaries:
        return False
    if m.tokenizer_fingerprint not in accepted_fingerprints(fingerprint) or m.seq_length != seq_length:
        return False
    for sh in s.shards:
        f = out / sh.file
        if not f.is_file() or f.stat().st_size != sh.num_bytes or sha256_file(f) != sh.sha256:
            return False
    return True
