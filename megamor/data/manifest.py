"""The manifest of a prepared data directory: its schema, validation, and atomic writes.

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

Writing shards: ``megamor.data.shard_writer``; reading them: ``megamor.data.shard_reader``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megamor.errors import InputError

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "megamor-packed-tokens"
FORMAT_VERSION = 1
SAMPLE_EXT = "tokens.npy"
DOCSTARTS_EXT = "docstarts.npy"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
_HASH_CHUNK = 1 << 20


class DataError(InputError, ValueError):
    """A data file (manifest or shard) is missing, corrupt or inconsistent."""

    kind = "data"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write ``manifest`` to ``path`` atomically (sorted keys: byte-identical on re-runs)."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def accepted_fingerprints(fingerprint: str | Sequence[str]) -> tuple[str, ...]:
    """A tokenizer fingerprint, or every form one tokenizer answers to (`Tokenizer.fingerprints`:
    the current one first, then the legacy one older manifests carry)."""
    return (fingerprint,) if isinstance(fingerprint, str) else tuple(fingerprint)
