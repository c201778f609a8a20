"""Packed-token webdataset shards: writing, manifest, and random-access reading.

Layout of a prepared data directory::

    out_dir/manifest.json                 # covers all splits
    out_dir/<split>/shard-000000.tar      # webdataset tar, one sample per key
        000000000.tokens.npy              # int32 array of seq_length + 1 tokens
        000000000.docstarts.npy           # optional (--keep-boundaries): int32 positions in
                                          # the sample where a document begins
    out_dir/tokenizer/                    # the tokenizer (written by `megamor data prepare`)

Documents are tokenized and concatenated with an EOS after each one, then cut
Megatron-style: sample ``i`` is ``stream[i*S : i*S + S + 1]`` (S = seq_length),
so consecutive samples overlap by one token and every token after the first is
a label exactly once. The trailing partial sample is dropped.

The manifest is written last and atomically, so its presence marks a complete
preparation; shard sizes and sha256 sums in it catch corrupt/truncated files.
Fields added after version 1 (``splits.*.doc_starts``, ``prepare``) are optional,
so manifests and shards of either age are read by either reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import webdataset as wds

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "megamor-packed-tokens"
FORMAT_VERSION = 1
SAMPLE_EXT = "tokens.npy"
DOCSTARTS_EXT = "docstarts.npy"
CORRUPT_POLICIES = ("error", "skip")
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
_HASH_CHUNK = 1 << 20
log = logging.getLogger("megamor.data")


class DataError(ValueError):
    """A data file (manifest or shard) is missing, corrupt or inconsistent."""


class TokenizerLike(Protocol):
    """What ``prepare_shards`` needs from a tokenizer (``tokenizer.Tokenizer`` fits)."""

    eos_id: int
    fingerprint: str

    @property
    def vocab_size(self) -> int: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the data directory, e.g. "train/shard-000000.tar"
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    samples_per_shard: int
    num_samples: int
    num_tokens: int  # tokens in the packed stream (incl. EOS), before dropping the tail
    source_sha256: str  # hash of the input documents; lets re-runs skip
    shards: tuple[ShardInfo, ...]
    doc_starts: bool = False  # shards carry a docstarts.npy member per sample


@dataclass(frozen=True)
class Manifest:
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    seq_length: int
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    dtype: str = "int32"
    path: Path | None = field(default=None, compare=False)  # where it was loaded from
    prepare: dict[str, Any] | None = None  # `megamor data prepare`: inputs, options, counts

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "seq_length": self.seq_length,
            "dtype": self.dtype,
            "splits": {
                name: {
                    "samples_per_shard": s.samples_per_shard,
                    "num_samples": s.num_samples,
                    "num_tokens": s.num_tokens,
                    "source_sha256": s.source_sha256,
                    "doc_starts": s.doc_starts,
                    "shards": [
                        {"file": sh.file, "num_samples": sh.num_samples,
                         "num_bytes": sh.num_bytes, "sha256": sh.sha256}
                        for sh in s.shards
                    ],
                }
                for name, s in sorted(self.splits.items())
            },
        }
        if self.prepare is not None:
            out["prepare"] = self.prepare
        return out


# ----------------------------------------------------------------------------- manifest I/O


def _field(obj: Any, key: str, typ: type, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: missing field '{where}{key}'")
    val = obj[key]
    if typ is int and isinstance(val, bool) or not isinstance(val, typ):
        raise DataError(f"{path}: field '{where}{key}' should be {typ.__name__}, got {val!r}")
    if typ is int and val < 0:
        raise DataError(f"{path}: field '{where}{key}' must be >= 0, got {val}")
    return val


def _parse_split(name: str, raw: Any, path: Path) -> SplitInfo:
    w = f"splits.{name}."
    sps = _field(raw, "samples_per_shard", int, w, path)
    n = _field(raw, "num_samples", int, w, path)
    shards_raw = _field(raw, "shards", list, w, path)
    shards = []
    for j, sh in enumerate(shards_raw):
        sw = f"{w}shards[{j}]."
        shards.append(ShardInfo(
            file=_field(sh, "file", str, sw, path),
            num_samples=_field(sh, "num_samples", int, sw, path),
            num_bytes=_field(sh, "num_bytes", int, sw, path),
            sha256=_field(sh, "sha256", str, sw, path),
        ))
        if Path(shards[-1].file).is_absolute() or ".." in Path(shards[-1].file).parts:
            raise DataError(f"{path}: field '{sw}file' must be a relative path inside the data dir")
        # All shards are full except possibly the last one.
        want_full = j < len(shards_raw) - 1
        if shards[-1].num_samples > sps or (want_full and shards[-1].num_samples != sps):
            raise DataError(f"{path}: field '{sw}num_samples'={shards[-1].num_samples} "
                            f"inconsistent with samples_per_shard={sps}")
    if sps == 0:
        raise DataError(f"{path}: field '{w}samples_per_shard' must be > 0")
    if sum(s.num_samples for s in shards) != n:
        raise DataError(f"{path}: field '{w}num_samples'={n} != sum over shards "
                        f"({sum(s.num_samples for s in shards)})")
    return SplitInfo(
        samples_per_shard=sps,
        num_samples=n,
        num_tokens=_field(raw, "num_tokens", int, w, path),
        source_sha256=_field(raw, "source_sha256", str, w, path),
        shards=tuple(shards),
        doc_starts=_optional_bool(raw, "doc_starts", w, path),
    )


def _optional_bool(obj: dict, key: str, where: str, path: Path) -> bool:
    val = obj.get(key, False)
    if not isinstance(val, bool):
        raise DataError(f"{path}: field '{where}{key}' should be bool, got {val!r}")
    return val


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate ``manifest.json`` (``path`` may be the file or its directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"manifest not found: {p}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read manifest {p}: {e}") from e
    if _field(raw, "format", str, "", p) != FORMAT_NAME:
        raise DataError(f"{p}: field 'format' should be {FORMAT_NAME!r}, got {raw['format']!r}")
    if _field(raw, "version", int, "", p) != FORMAT_VERSION:
        raise DataError(f"{p}: field 'version' {raw['version']} unsupported (want {FORMAT_VERSION})")
    dtype = _field(raw, "dtype", str, "", p)
    if dtype != "int32":
        raise DataError(f"{p}: field 'dtype' must be 'int32', got {dtype!r}")
    seq_length = _field(raw, "seq_length", int, "", p)
    if seq_length < 1:
        raise DataError(f"{p}: field 'seq_length' must be >= 1, got {seq_length}")
    splits_raw = _field(raw, "splits", dict, "", p)
    prepare = raw.get("prepare")
    if prepare is not None and not isinstance(prepare, dict):
        raise DataError(f"{p}: field 'prepare' should be an object, got {prepare!r}")
    return Manifest(
        tokenizer_fingerprint=_field(raw, "tokenizer_fingerprint", str, "", p),
        vocab_size=_field(raw, "vocab_size", int, "", p),
        eos_id=_field(raw, "eos_id", int, "", p),
        seq_length=seq_length,
        splits={name: _parse_split(name, s, p) for name, s in splits_raw.items()},
        dtype=dtype,
        path=p,
        prepare=prepare,
    )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


def _docs_sha256(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def pack_documents(token_docs: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """Concatenate tokenized documents, each followed by ``eos_id``, as an int32 stream."""
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int32)
    for ids in token_docs:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype="<i4"), allow_pickle=False)
    return buf.getvalue()


_sample_bytes = _npy_bytes


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


def _write_shard(path: Path, samples: np.ndarray, first_index: int) -> None:
    """Write one tar shard atomically."""
    _atomic_write_bytes(path, _shard_bytes(samples, first_index))


def _check_split_name(split_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split_name) or split_name in (".", ".."):
        raise ValueError(f"invalid split name {split_name!r}")


class PackedSplitWriter:
    """Streaming packer + shard writer for one split (constant memory in the corpus size).

    Documents arrive in order (``add_documents``); each is followed by EOS in the
    stream, and sample ``i`` is ``stream[i*S : i*S + S + 1]`` as in ``prepare_shards``.
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

    def add_token_docs(self, token_docs: Sequence[Sequence[int]]) -> None:
        lengths = [len(d) for d in token_docs]
        flat = np.fromiter((t for d in token_docs for t in d), dtype=np.int32, count=sum(lengths))
        self.add_documents(flat, lengths)

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
        _atomic_write_bytes(self.out / rel, data)
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
            if _SHARD_RE.match(f.name) and f.name not in keep:
                f.unlink()


def _write_manifest(path: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(path, text.encode("utf-8"))


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
            _write_manifest(path, Manifest(
                tokenizer_fingerprint=m.tokenizer_fingerprint, vocab_size=m.vocab_size,
                eos_id=m.eos_id, seq_length=m.seq_length, splits=kept, dtype=m.dtype,
                prepare=m.prepare))
        else:
            path.unlink()
    return m


def _accepted(fingerprint: str | Sequence[str]) -> tuple[str, ...]:
    """A tokenizer fingerprint, or every form one tokenizer answers to (`Tokenizer.fingerprints`:
    the current one first, then the legacy one older manifests carry)."""
    return (fingerprint,) if isinstance(fingerprint, str) else tuple(fingerprint)


def check_compatible(existing: Manifest | None, replacing: Sequence[str],
                     fingerprint: str | Sequence[str],
                     seq_length: int, manifest_path: Path) -> None:
    """Splits kept beside new ones must share their tokenizer and sequence length."""
    if existing is None:
        return
    others = set(existing.splits) - set(replacing)
    if others and (existing.tokenizer_fingerprint not in _accepted(fingerprint)
                   or existing.seq_length != seq_length):
        raise DataError(
            f"{manifest_path}: existing splits {sorted(others)} use tokenizer "
            f"{existing.tokenizer_fingerprint[:12]}/seq_length={existing.seq_length}, "
            f"cannot add split(s) {sorted(replacing)} with {_accepted(fingerprint)[0][:12]}/"
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
    _write_manifest(path, manifest)
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
    if m.tokenizer_fingerprint not in _accepted(fingerprint) or m.seq_length != seq_length:
        return False
    for sh in s.shards:
        f = out / sh.file
        if not f.is_file() or f.stat().st_size != sh.num_bytes or _sha256_file(f) != sh.sha256:
            return False
    return True


_split_is_current = split_is_current


def prepare_shards(
    docs: Sequence[str],
    tokenizer: TokenizerLike,
    seq_length: int,
    out_dir: str | Path,
    samples_per_shard: int = 256,
    split_name: str = "train",
    *,
    keep_boundaries: bool = False,
) -> Manifest:
    """Tokenize ``docs``, pack into ``seq_length + 1``-token samples, write shards + manifest.

    Adds/replaces the ``split_name`` entry of ``out_dir/manifest.json``; other
    splits already there are kept, which requires the same tokenizer and
    ``seq_length`` (else ``DataError``). Re-running with identical inputs is a
    no-op (verified by sha256); output bytes are deterministic. In-process and
    in-memory: for corpora on disk use ``megamor.data.prepare.prepare_dataset``.
    """
    if seq_length < 1 or samples_per_shard < 1:
        raise ValueError("seq_length and samples_per_shard must be >= 1")
    _check_split_name(split_name)
    out = Path(out_dir)
    (out / split_name).mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE

    existing: Manifest | None = load_manifest(manifest_path) if manifest_path.exists() else None
    check_compatible(existing, [split_name], tokenizer.fingerprint, seq_length, manifest_path)

    src = _docs_sha256(docs)
    if existing is not None and split_is_current(out, existing, split_name, src, tokenizer.fingerprint,
                                                 seq_length, samples_per_shard, keep_boundaries):
        return existing

    invalidate_splits(out, [split_name])
    writer = PackedSplitWriter(out, split_name, seq_length, samples_per_shard, tokenizer.eos_id,
                               keep_boundaries)
    writer.add_token_docs(tokenizer.encode_batch(list(docs)))
    info = writer.finish(source_sha256=src)
    manifest = commit_manifest(out, existing, {split_name: info}, tokenizer, seq_length)
    # Remove shards left over from an earlier, larger preparation of this split.
    writer.remove_stale()
    return manifest


# ----------------------------------------------------------------------------- reading


class ShardedTokenDataset(torch.utils.data.Dataset):
    """Random access to packed samples: ``ds[i]`` is a LongTensor of ``seq_length + 1``.

    Only the manifest is read up front. On first access to a shard, its size
    and sha256 are checked (streamed, not kept in memory) and its tar member
    offsets are indexed; samples are then read with ``os.pread``. Picklable for
    DataLoader workers (file descriptors are reopened per process).

    ``on_corrupt="error"`` (default): a missing, truncated or corrupt shard raises
    ``DataError`` naming the file. ``on_corrupt="skip"`` (opt-in): such a shard is
    logged loudly (``WARNING`` on the ``megamor.data`` logger) and its samples are
    replaced by the samples at the same offsets of the next good shard, so batch
    shapes and the order of every other sample are unchanged; ``skipped_shards``
    and ``substituted_samples`` count what happened.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        expect_seq_length: int | None = None,
        expect_fingerprint: str | Sequence[str] | None = None,
        *,
        verify_checksums: bool = True,
        on_corrupt: str = "error",
    ) -> None:
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt={on_corrupt!r}: must be one of {CORRUPT_POLICIES}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.verify_checksums = verify_checksums
        self.on_corrupt = on_corrupt
        self.manifest = load_manifest(self.data_dir)
        mpath = self.manifest.path
        if expect_seq_length is not None and self.manifest.seq_length != expect_seq_length:
            raise DataError(f"{mpath}: seq_length mismatch: manifest has "
                            f"{self.manifest.seq_length}, expected {expect_seq_length}")
        if expect_fingerprint is not None and \
                self.manifest.tokenizer_fingerprint not in _accepted(expect_fingerprint):
            raise DataError(f"{mpath}: tokenizer fingerprint mismatch: manifest has "
                            f"{self.manifest.tokenizer_fingerprint}, expected "
                            f"{_accepted(expect_fingerprint)[0]}")
        if split not in self.manifest.splits:
            raise DataError(f"{mpath}: no split {split!r} (have {sorted(self.manifest.splits)})")
        self.info = self.manifest.splits[split]
        self.seq_length = self.manifest.seq_length
        self.has_doc_starts = self.info.doc_starts
        # shard -> per sample (offset, size) of tokens.npy, and of docstarts.npy when present
        self._index: dict[int, list[tuple[int, int]]] = {}
        self._starts_index: dict[int, list[tuple[int, int]]] = {}
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.skipped_shards: dict[str, str] = {}  # shard file -> reason (on_corrupt="skip")
        self.substituted_samples = 0

    def __len__(self) -> int:
        return self.info.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close open shard files (only those opened by this process)."""
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}

    def _shard_path(self, j: int) -> Path:
        return self.data_dir / self.info.shards[j].file

    def _build_index(self, j: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        sh, path = self.info.shards[j], self._shard_path(j)
        if not path.is_file():
            raise DataError(f"shard missing: {path} (listed in {self.manifest.path})")
        size = path.stat().st_size
        if size != sh.num_bytes:
            raise DataError(f"shard {path}: size {size} bytes, manifest says {sh.num_bytes} "
                            f"(truncated or rewritten?)")
        if self.verify_checksums and (digest := _sha256_file(path)) != sh.sha256:
            raise DataError(f"shard {path}: sha256 {digest} does not match manifest {sh.sha256} (corrupt)")
        first = j * self.info.samples_per_shard
        want = {"%09d.%s" % (first + k, SAMPLE_EXT): k for k in range(sh.num_samples)}
        want_starts = {"%09d.%s" % (first + k, DOCSTARTS_EXT): k for k in range(sh.num_samples)} \
            if self.has_doc_starts else {}
        entries: list[tuple[int, int] | None] = [None] * sh.num_samples
        starts: list[tuple[int, int] | None] = [None] * (sh.num_samples if self.has_doc_starts else 0)
        try:
            with tarfile.open(path, mode="r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    k = want.get(member.name)
                    if k is not None:
                        entries[k] = (member.offset_data, member.size)
                    elif (k := want_starts.get(member.name)) is not None:
                        starts[k] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"shard {path}: unreadable tar ({e})") from e
        for what, lst in ((SAMPLE_EXT, entries), (DOCSTARTS_EXT, starts)):
            if any(e is None for e in lst):
                missing = sum(e is None for e in lst)
                raise DataError(f"shard {path}: {missing} of {sh.num_samples} samples' "
                                f"{what} missing from tar")
        return entries, starts  # type: ignore[return-value]

    def _fd(self, j: int) -> int:
        if self._pid != os.getpid():  # forked: don't share descriptors with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(j)
        if fd is None:
            try:
                fd = os.open(self._shard_path(j), os.O_RDONLY)
            except FileNotFoundError:
                raise DataError(f"shard missing: {self._shard_path(j)}") from None
            self._fds[j] = fd
        return fd

    def _read_npy(self, j: int, where: tuple[int, int], i: int, what: str) -> np.ndarray:
        with self._lock:
            fd = self._fd(j)
        offset, size = where
        raw = os.pread(fd, size, offset)
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise DataError(f"shard {self._shard_path(j)}: cannot decode {what} of sample {i}: {e}") from e

    def _read_tokens(self, j: int, k: int, i: int) -> np.ndarray:
        with self._lock:
            if j not in self._index:
                self._index[j], self._starts_index[j] = self._build_index(j)
        arr = self._read_npy(j, self._index[j][k], i, SAMPLE_EXT)
        if arr.shape != (self.seq_length + 1,):
            raise DataError(f"shard {self._shard_path(j)}: sample {i} has shape {arr.shape}, "
                            f"expected ({self.seq_length + 1},)")
        return arr

    def _mark_bad(self, j: int, err: DataError) -> None:
        path = str(self._shard_path(j))
        if path not in self.skipped_shards:
            self.skipped_shards[path] = str(err)
            log.warning("SKIPPING corrupt shard %s (on_corrupt=skip): %s -- %d of %d shards of split "
                        "%r skipped so far; its samples are replaced by those of the next good shard",
                        path, err, len(self.skipped_shards), len(self.info.shards), self.split)

    def _locate(self, i: int) -> tuple[int, int, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for split {self.split!r} of size {n}")
        j, k = divmod(i, self.info.samples_per_shard)
        return i, j, k

    def _get(self, i: int) -> tuple[np.ndarray, int, int]:
        """(tokens, shard, offset) of sample ``i``, substituting per the on_corrupt policy."""
        i, j, k = self._locate(i)
        if self.on_corrupt == "error":
            return self._read_tokens(j, k, i), j, k
        nshards = len(self.info.shards)
        for _ in range(nshards):
            if str(self._shard_path(j)) not in self.skipped_shards:
                try:
                    arr = self._read_tokens(j, k, i)
                    if self.has_doc_starts:
                        self._read_npy(j, self._starts_index[j][k], i, DOCSTARTS_EXT)
                    if (j, k) != self._locate(i)[1:]:
                        self.substituted_samples += 1
                    return arr, j, k
                except DataError as e:
                    self._mark_bad(j, e)
            j = (j + 1) % nshards
            k %= self.info.shards[j].num_samples
        raise DataError(f"{self.data_dir}: all {nshards} shards of split {self.split!r} are "
                        f"unreadable (on_corrupt=skip): {self.skipped_shards}")

    def __getitem__(self, i: int) -> torch.Tensor:
        arr, _, _ = self._get(i)
        return torch.from_numpy(arr.astype(np.int64))

    def doc_starts(self, i: int) -> np.ndarray:
        """Positions in sample ``i`` (0..seq_length) where a document begins (int32).

        Only for splits prepared with ``--keep-boundaries`` (``DataError`` otherwise).
        """
        if not self.has_doc_starts:
            raise DataError(f"{self.manifest.path}: split {self.split!r} was prepared without "
                            "document boundaries (use `megamor data prepare --keep-boundaries`)")
        _, j, k = self._get(i)
        return self._read_npy(j, self._starts_index[j][k], i, DOCSTARTS_EXT).astype(np.int32)
