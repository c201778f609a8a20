"""Packed-token webdataset shards: writing, manifest, and random-access reading.

Layout of a prepared data directory::

    out_dir/manifest.json                 # covers all splits
    out_dir/<split>/shard-000000.tar      # webdataset tar, one member per sample
        000000000.tokens.npy              # int32 array of seq_length + 1 tokens

Documents are tokenized and concatenated with an EOS after each one, then cut
Megatron-style: sample ``i`` is ``stream[i*S : i*S + S + 1]`` (S = seq_length),
so consecutive samples overlap by one token and every token after the first is
a label exactly once. The trailing partial sample is dropped.

The manifest is written last and atomically, so its presence marks a complete
preparation; shard sizes and sha256 sums in it catch corrupt/truncated files.
"""

from __future__ import annotations

import hashlib
import io
import json
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
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
_HASH_CHUNK = 1 << 20


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


@dataclass(frozen=True)
class Manifest:
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    seq_length: int
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    dtype: str = "int32"
    path: Path | None = field(default=None, compare=False)  # where it was loaded from

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1

    def to_json(self) -> dict[str, Any]:
        return {
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
                    "shards": [
                        {"file": sh.file, "num_samples": sh.num_samples,
                         "num_bytes": sh.num_bytes, "sha256": sh.sha256}
                        for sh in s.shards
                    ],
                }
                for name, s in sorted(self.splits.items())
            },
        }


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
    )


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
    return Manifest(
        tokenizer_fingerprint=_field(raw, "tokenizer_fingerprint", str, "", p),
        vocab_size=_field(raw, "vocab_size", int, "", p),
        eos_id=_field(raw, "eos_id", int, "", p),
        seq_length=seq_length,
        splits={name: _parse_split(name, s, p) for name, s in splits_raw.items()},
        dtype=dtype,
        path=p,
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


def _sample_bytes(sample: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sample, dtype="<i4"), allow_pickle=False)
    return buf.getvalue()


def _write_shard(path: Path, samples: np.ndarray, first_index: int) -> None:
    """Write one tar shard atomically with fixed metadata (byte-identical on re-runs)."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="megamor", group="megamor",
                       mode=0o444) as tw:
        for k, sample in enumerate(samples):
            tw.write({"__key__": "%09d" % (first_index + k), SAMPLE_EXT: _sample_bytes(sample)})
    _atomic_write_bytes(path, buf.getvalue())


def _split_is_current(out: Path, m: Manifest, split: str, src: str, fingerprint: str,
                      seq_length: int, samples_per_shard: int) -> bool:
    s = m.splits.get(split)
    if s is None or s.source_sha256 != src or s.samples_per_shard != samples_per_shard:
        return False
    if m.tokenizer_fingerprint != fingerprint or m.seq_length != seq_length:
        return False
    for sh in s.shards:
        f = out / sh.file
        if not f.is_file() or f.stat().st_size != sh.num_bytes or _sha256_file(f) != sh.sha256:
            return False
    return True


def prepare_shards(
    docs: Sequence[str],
    tokenizer: TokenizerLike,
    seq_length: int,
    out_dir: str | Path,
    samples_per_shard: int = 256,
    split_name: str = "train",
) -> Manifest:
    """Tokenize ``docs``, pack into ``seq_length + 1``-token samples, write shards + manifest.

    Adds/replaces the ``split_name`` entry of ``out_dir/manifest.json``; other
    splits already there are kept, which requires the same tokenizer and
    ``seq_length`` (else ``DataError``). Re-running with identical inputs is a
    no-op (verified by sha256); output bytes are deterministic.
    """
    if seq_length < 1 or samples_per_shard < 1:
        raise ValueError("seq_length and samples_per_shard must be >= 1")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", split_name) or split_name in (".", ".."):
        raise ValueError(f"invalid split name {split_name!r}")
    out = Path(out_dir)
    (out / split_name).mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_FILE

    existing: Manifest | None = load_manifest(manifest_path) if manifest_path.exists() else None
    if existing is not None:
        others = set(existing.splits) - {split_name}
        if others and (existing.tokenizer_fingerprint != tokenizer.fingerprint
                       or existing.seq_length != seq_length):
            raise DataError(
                f"{manifest_path}: existing splits {sorted(others)} use tokenizer "
                f"{existing.tokenizer_fingerprint[:12]}/seq_length={existing.seq_length}, "
                f"cannot add split {split_name!r} with {tokenizer.fingerprint[:12]}/"
                f"seq_length={seq_length}; use a fresh out_dir")

    src = _docs_sha256(docs)
    if existing is not None and _split_is_current(out, existing, split_name, src, tokenizer.fingerprint,
                                                  seq_length, samples_per_shard):
        return existing

    stream = pack_documents(tokenizer.encode_batch(list(docs)), tokenizer.eos_id)
    n_samples = max(0, (len(stream) - 1) // seq_length)
    # Strided view: row i = stream[i*S : i*S + S + 1] (no copy).
    samples = np.lib.stride_tricks.as_strided(
        stream, shape=(n_samples, seq_length + 1),
        strides=(stream.strides[0] * seq_length, stream.strides[0]), writeable=False)

    shards: list[ShardInfo] = []
    for j, start in enumerate(range(0, n_samples, samples_per_shard)):
        rel = f"{split_name}/{SHARD_PATTERN % j}"
        chunk = samples[start:start + samples_per_shard]
        _write_shard(out / rel, chunk, start)
        shards.append(ShardInfo(file=rel, num_samples=len(chunk),
                                num_bytes=(out / rel).stat().st_size, sha256=_sha256_file(out / rel)))

    splits = dict(existing.splits) if existing is not None else {}
    splits[split_name] = SplitInfo(samples_per_shard=samples_per_shard, num_samples=n_samples,
                                   num_tokens=int(len(stream)), source_sha256=src,
                                   shards=tuple(shards))
    manifest = Manifest(tokenizer_fingerprint=tokenizer.fingerprint, vocab_size=tokenizer.vocab_size,
                        eos_id=tokenizer.eos_id, seq_length=seq_length, splits=splits,
                        path=manifest_path)
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(manifest_path, text.encode("utf-8"))

    # Remove shards left over from an earlier, larger preparation of this split.
    keep = {Path(sh.file).name for sh in shards}
    for f in (out / split_name).iterdir():
        if _SHARD_RE.match(f.name) and f.name not in keep:
            f.unlink()
    return manifest


# ----------------------------------------------------------------------------- reading


class ShardedTokenDataset(torch.utils.data.Dataset):
    """Random access to packed samples: ``ds[i]`` is a LongTensor of ``seq_length + 1``.

    Only the manifest is read up front. On first access to a shard, its size
    and sha256 are checked (streamed, not kept in memory) and its tar member
    offsets are indexed; samples are then read with ``os.pread``. Picklable for
    DataLoader workers (file descriptors are reopened per process).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        expect_seq_length: int | None = None,
        expect_fingerprint: str | None = None,
        *,
        verify_checksums: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.verify_checksums = verify_checksums
        self.manifest = load_manifest(self.data_dir)
        mpath = self.manifest.path
        if expect_seq_length is not None and self.manifest.seq_length != expect_seq_length:
            raise DataError(f"{mpath}: seq_length mismatch: manifest has "
                            f"{self.manifest.seq_length}, expected {expect_seq_length}")
        if expect_fingerprint is not None and self.manifest.tokenizer_fingerprint != expect_fingerprint:
            raise DataError(f"{mpath}: tokenizer fingerprint mismatch: manifest has "
                            f"{self.manifest.tokenizer_fingerprint}, expected {expect_fingerprint}")
        if split not in self.manifest.splits:
            raise DataError(f"{mpath}: no split {split!r} (have {sorted(self.manifest.splits)})")
        self.info = self.manifest.splits[split]
        self.seq_length = self.manifest.seq_length
        self._index: dict[int, list[tuple[int, int]]] = {}  # shard -> [(offset, size)] per sample
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

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

    def _build_index(self, j: int) -> list[tuple[int, int]]:
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
        entries: list[tuple[int, int] | None] = [None] * sh.num_samples
        try:
            with tarfile.open(path, mode="r:") as tf:
                for member in tf:
                    k = want.get(member.name)
                    if k is not None and member.isfile():
                        entries[k] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"shard {path}: unreadable tar ({e})") from e
        if any(e is None for e in entries):
            missing = sum(e is None for e in entries)
            raise DataError(f"shard {path}: {missing} of {sh.num_samples} samples missing from tar")
        return entries  # type: ignore[return-value]

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

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for split {self.split!r} of size {n}")
        j, k = divmod(i, self.info.samples_per_shard)
        with self._lock:
            index = self._index.get(j)
            if index is None:
                index = self._index[j] = self._build_index(j)
            fd = self._fd(j)
        offset, size = index[k]
        raw = os.pread(fd, size, offset)
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise DataError(f"shard {self._shard_path(j)}: cannot decode sample {i}: {e}") from e
        if arr.shape != (self.seq_length + 1,):
            raise DataError(f"shard {self._shard_path(j)}: sample {i} has shape {arr.shape}, "
                            f"expected ({self.seq_length + 1},)")
        return torch.from_numpy(arr.astype(np.int64))
