"""Reading raw text corpora for ``megamor data prepare`` and ``megamor tokenizer train``.

Inputs (any mix, in the order given): files, directories (searched recursively,
sorted, hidden entries skipped), glob patterns, ``datasets`` saved with
``save_to_disk``, and the word ``builtin`` (the embedded corpus). File formats:

    .txt  .txt.gz  .txt.zst        one document per file (or per line / paragraph: txt_mode)
    .jsonl .jsonl.gz .jsonl.zst    one JSON object per line, text in ``text_field``
    .parquet                       text in column ``text_field`` (needs pyarrow)
    <dir with state.json/dataset_dict.json>   a saved HF dataset (needs datasets)

The main process only reads bytes and cuts them into ``Chunk``s; decoding, JSON
parsing and the checks on each record run in ``decode_chunk``, which the
preparation calls in its worker processes. Bad input that is not fatal
(non-UTF-8 bytes, empty documents, empty files, lines that are not JSON) is
counted in ``Counts``; a missing text field, a truncated compressed file or an
unreadable parquet file is a ``DataError`` naming the file.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from megamor.data.manifest import DataError

TXT_MODES = ("file", "line", "paragraph")
TEXT_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
BUILTIN = "builtin"
MAX_EXAMPLES = 10  # problem locations kept for the report
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    """One resolved input: a file, a saved dataset directory, or the builtin corpus."""

    path: str
    kind: str  # txt | jsonl | parquet | hf_dataset | builtin
    compression: str | None = None  # gz | zst

    def content_sha256(self) -> str:
        """Hash of the input's bytes (directories: every file, by relative path)."""
        h = hashlib.sha256()
        if self.kind == BUILTIN:
            from megamor.data.corpus import builtin_corpus
            for split, docs in zip(("train", "val"), builtin_corpus()):
                for d in docs:
                    b = f"{split}\0{d}".encode("utf-8")
                    h.update(len(b).to_bytes(8, "little"))
                    h.update(b)
            return h.hexdigest()
        p = Path(self.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if p.is_dir():
                h.update(str(f.relative_to(p)).encode("utf-8") + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()

    def size(self) -> int:
        if self.kind == BUILTIN:
            return 0
        p = Path(self.path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size


@dataclass
class Counts:
    """What the reading saw; summed over chunks and files."""

    files: int = 0
    empty_files: int = 0
    ignored_files: int = 0  # unsupported files found inside directories
    input_bytes: int = 0
    documents: int = 0  # kept (non-empty)
    empty_documents: int = 0  # empty or whitespace-only: skipped
    non_utf8_documents: int = 0  # invalid UTF-8 replaced by U+FFFD
    bad_json_lines: int = 0  # .jsonl lines that are not a JSON object: skipped
    examples: list[str] = field(default_factory=list)  # first problem locations

    def add(self, other: "Counts") -> None:
        for f in fields(self):
            if f.name == "examples":
                room = MAX_EXAMPLES - len(self.examples)
                self.examples.extend(other.examples[:max(room, 0)])
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def note(self, what: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(what)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Chunk:
    """A run of consecutive records of one input, decoded and checked by ``decode_chunk``.

    ``kind``: ``text`` (payload: bytes, one document each), ``jsonl`` (payload:
    raw lines), ``values`` (payload: str / bytes / None column values).
    ``first`` is the 1-based line (or row) number of ``payload[0]`` for messages; ``lines``
    gives each record's line when they are not consecutive (paragraphs).
    """

    source: str
    kind: str
    first: int
    payload: list
    nbytes: int
    split: str | None = None  # a fixed split for every document (builtin corpus)
    lines: list[int] | None = None

    def line(self, n: int) -> int:
        return self.lines[n] if self.lines is not None else self.first + n


# ----------------------------------------------------------------------------- resolving


def _classify(p: Path) -> tuple[str, str | None] | None:
    """(kind, compression) of a file by its name, or None when unsupported."""
    name = p.name.lower()
    comp = None
    for suf, c in COMPRESSIONS.items():
        if name.endswith(suf):
            comp, name = c, name[: -len(suf)]
            break
    for suf, kind in TEXT_SUFFIXES.items():
        if name.endswith(suf):
            if kind == "parquet" and comp is not None:
                return None
            return kind, comp
    return None


def is_saved_dataset(p: Path) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (Dataset or DatasetDict)."""
    return p.is_dir() and ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def _supported() -> str:
    exts = [s + c for s in TEXT_SUFFIXES for c in ("", ".gz", ".zst") if not (s == ".parquet" and c)]
    return ", ".join(exts) + ", saved datasets, 'builtin'"


def _walk(d: Path, out: list[InputFile], counts: Counts) -> None:
    for entry in sorted(d.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_saved_dataset(entry):
                out.append(InputFile(str(entry), "hf_dataset"))
            else:
                _walk(entry, out, counts)
        elif entry.is_file():
            c = _classify(entry)
            if c is None:
                counts.ignored_files += 1
                counts.note(f"{entry}: ignored (unsupported format)")
            else:
                out.append(InputFile(str(entry), *c))


def _resolve_one(p: Path, spec: str, out: list[InputFile], counts: Counts) -> None:
    if is_saved_dataset(p):
        out.append(InputFile(str(p), "hf_dataset"))
    elif p.is_dir():
        before = len(out)
        _walk(p, out, counts)
        if len(out) == before:
            raise DataError(f"input directory {p}: no supported files ({_supported()})")
    elif p.is_file():
        c = _classify(p)
        if c is None:
            raise DataError(f"input {p}: unsupported format (supported: {_supported()})")
        out.append(InputFile(str(p), *c))
    else:
        raise DataError(f"input not found: {spec}")


def resolve_inputs(specs: Sequence[str | os.PathLike], counts: Counts | None = None) -> list[InputFile]:
    """Expand files, directories, globs and ``builtin`` into an ordered list of inputs."""
    counts = counts if counts is not None else Counts()
    out: list[InputFile] = []
    if not specs:
        raise DataError("no inputs given")
    for spec in specs:
        s = str(spec)
        if s == BUILTIN:
            out.append(InputFile(BUILTIN, BUILTIN))
        elif _GLOB_CHARS & set(s) and not Path(s).exists():
            matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not matches:
                raise DataError(f"input pattern {s!r} matches no files")
            for m in matches:
                _resolve_one(Path(m), m, out, counts)
        else:
            _resolve_one(Path(os.path.expanduser(s)), s, out, counts)
    return out


# ----------------------------------------------------------------------------- reading


def _require(module: str, what: str, path: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the '{module}' package "
                        "(pip install 'megamor[data]')") from None


class _ZstdRaw(io.RawIOBase):
    """Decompresses a (multi-frame) .zst file; a file ending inside a frame is an ``EOFError``
    (zstandard's ``stream_reader`` silently returns what it could decode)."""

    def __init__(self, path: str, zstd: Any) -> None:
        self._f = open(path, "rb")
        self._zstd = zstd
        self._d = zstd.ZstdDecompressor().decompressobj()
        self._buf, self._pos = b"", 0
        self._in_frame = self._done = False

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> None:
        out = []
        while data:
            self._in_frame = True
            out.append(self._d.decompress(data))
            if self._d.eof:
                data = self._d.unused_data
                self._d = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
            else:
                data = b""
        self._buf, self._pos = self._buf[self._pos:] + b"".join(out), 0

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf) and not self._done:
            data = self._f.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd data ends inside a frame")
                self._done = True
                break
            self._feed(data)
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_binary(inp: InputFile) -> BinaryIO:
    if inp.compression == "gz":
        return gzip.open(inp.path, "rb")  # type: ignore[return-value]
    if inp.compression == "zst":
        zstd = _require("zstandard", ".zst files", inp.path)
        return io.BufferedReader(_ZstdRaw(inp.path, zstd), buffer_size=1 << 20)  # type: ignore[return-value]
    return open(inp.path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [EOFError, OSError, gzip.BadGzipFile]
    try:
        import zstandard
        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


class _Batcher:
    """Groups records of one input into chunks of about ``chunk_bytes``."""

    def __init__(self, source: str, kind: str, chunk_bytes: int, max_records: int = 8192,
                 explicit_lines: bool = False) -> None:
        self.source, self.kind = source, kind
        self.chunk_bytes, self.max_records = chunk_bytes, max_records
        self.explicit_lines = explicit_lines
        self.payload: list = []
        self.lines: list[int] = []
        self.nbytes = 0
        self.next_line = 1

    def add(self, record: Any, nbytes: int, line: int | None = None) -> Chunk | None:
        self.lines.append(self.next_line if line is None else line)
        self.payload.append(record)
        self.nbytes += nbytes
        self.next_line += 1
        if self.nbytes >= self.chunk_bytes or len(self.payload) >= self.max_records:
            return self.flush()
        return None

    def flush(self) -> Chunk | None:
        if not self.payload:
            return None
        c = Chunk(self.source, self.kind, self.lines[0], self.payload, self.nbytes,
                  lines=self.lines if self.explicit_lines else None)
        self.payload, self.lines, self.nbytes = [], [], 0
        return c


def _iter_text_file(inp: InputFile, txt_mode: str, chunk_bytes: int, counts: Counts) -> Iterator[Chunk]:
    kind = "jsonl" if inp.kind == "jsonl" else "text"
    b = _Batcher(inp.path, kind, chunk_bytes, explicit_lines=kind == "text" and txt_mode == "paragraph")
    total = 0
    with _open_binary(inp) as f:
        if kind == "text" and txt_mode == "file":
            data = f.read()
            total = len(data)
            if data:
                yield Chunk(inp.path, "text", 1, [data], len(data))
        elif kind == "text" and txt_mode == "paragraph":
            para: list[bytes] = []
            start = 1
            for n, line in enumerate(f, 1):
                total += len(line)
                if line.strip():
                    if not para:
                        start = n
                    para.append(line)
                elif para:
                    if c := b.add(b"".join(para).rstrip(b"\r\n"), sum(map(len, para)), start):
                        yield c
                    para = []
            if para:
                if c := b.add(b"".join(para).rstrip(b"\r\n"), sum(map(len, para)), start):
                    yield c
        else:  # one record per line: txt line mode, jsonl
            for line in f:
                total += len(line)
                rec = line.rstrip(b"\r\n") if kind == "text" else line
                if c := b.add(rec, len(line)):
                    yield c
    if c := b.flush():
        yield c
    counts.input_bytes += total
    if total == 0:
        counts.empty_files += 1
        counts.note(f"{inp.path}: empty file")


def _iter_values(source: str, batches: Iterator[list], nbytes_total: int, counts: Counts,
                 chunk_bytes: int) -> Iterator[Chunk]:
    b = _Batcher(source, "values", chunk_bytes)
    rows = 0
    for values in batches:
        for v in values:
            rows += 1
            if c := b.add(v, len(v) if isinstance(v, (str, bytes)) else 1):
                yield c
    if c := b.flush():
        yield c
    counts.input_bytes += nbytes_total
    if rows == 0:
        counts.empty_files += 1
        counts.note(f"{source}: no rows")


def _iter_parquet(inp: InputFile, text_field: str, chunk_bytes: int, counts: Counts) -> Iterator[Chunk]:
    pq = _require("pyarrow.parquet", ".parquet files", inp.path)
    import pyarrow as pa
    try:
        pf = pq.ParquetFile(inp.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{inp.path}: cannot read parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{inp.path}: no text field {text_field!r} (columns: {names}); "
                        "choose one with --text-field")

    def batches() -> Iterator[list]:
        try:
            for rb in pf.iter_batches(batch_size=1024, columns=[text_field]):
                yield rb.column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{inp.path}: cannot read parquet file: {e}") from e

    yield from _iter_values(inp.path, batches(), os.path.getsize(inp.path), counts, chunk_bytes)


def _iter_hf_dataset(inp: InputFile, text_field: str, hf_split: str, chunk_bytes: int,
                     counts: Counts) -> Iterator[Chunk]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets = _require("datasets", "saved datasets", inp.path)
    try:
        ds = datasets.load_from_disk(inp.path)
    except Exception as e:  # datasets raises several kinds
        raise DataError(f"{inp.path}: cannot load saved dataset: {e}") from e
    source = inp.path
    if isinstance(ds, datasets.DatasetDict):
        if hf_split not in ds:
            raise DataError(f"{inp.path}: saved DatasetDict has no split {hf_split!r} "
                            f"(splits: {sorted(ds)}); choose one with --hf-split")
        ds, source = ds[hf_split], f"{inp.path}[{hf_split}]"
    if text_field not in ds.column_names:
        raise DataError(f"{source}: no text field {text_field!r} (columns: {ds.column_names}); "
                        "choose one with --text-field")
    col = ds.select_columns([text_field])

    def batches() -> Iterator[list]:
        for batch in col.iter(batch_size=1024):
            yield batch[text_field]

    yield from _iter_values(source, batches(), inp.size(), counts, chunk_bytes)


def _iter_builtin(counts: Counts) -> Iterator[Chunk]:
    from megamor.data.corpus import builtin_corpus
    train, val = builtin_corpus()
    for split, docs in (("train", train), ("val", val)):
        n = sum(len(d) for d in docs)
        counts.input_bytes += n
        if docs:
            yield Chunk(f"{BUILTIN}:{split}", "values", 1, list(docs), n, split=split)


def iter_chunks(inputs: Sequence[InputFile], *, text_field: str = "text", txt_mode: str = "file",
                hf_split: str = "train", chunk_bytes: int = 1 << 20,
                counts: Counts | None = None) -> Iterator[Chunk]:
    """Chunks of every input in order; file-level counts go to ``counts``."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={txt_mode!r}: must be one of {TXT_MODES}")
    counts = counts if counts is not None else Counts()
    errors = _read_errors()
    for inp in inputs:
        counts.files += 1
        if inp.kind == BUILTIN:
            yield from _iter_builtin(counts)
        elif inp.kind == "parquet":
            yield from _iter_parquet(inp, text_field, chunk_bytes, counts)
        elif inp.kind == "hf_dataset":
            yield from _iter_hf_dataset(inp, text_field, hf_split, chunk_bytes, counts)
        else:
            try:
                yield from _iter_text_file(inp, txt_mode, chunk_bytes, counts)
            except errors as e:
                what = f"{inp.compression} " if inp.compression else ""
                raise DataError(f"{inp.path}: cannot read {what}file (truncated or corrupt?): "
                                f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- decoding


def _to_text(raw: bytes, where: str, counts: Counts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        counts.non_utf8_documents += 1
        counts.note(f"{where}: non-UTF-8 bytes replaced ({e.reason} at byte {e.start})")
        return raw.decode("utf-8", errors="replace")


def _valid_str(text: str, where: str, counts: Counts) -> str:
    """Lone surrogates (from JSON escapes) cannot be encoded: replace and count them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        counts.non_utf8_documents += 1
        counts.note(f"{where}: unpaired surrogates replaced")
        return text.encode("utf-8", errors="replace").decode("utf-8")


def decode_chunk(chunk: Chunk, text_field: str = "text") -> tuple[list[str], Counts]:
    """The chunk's non-empty documents as text, and what was counted on the way."""
    counts = Counts()
    texts: list[str] = []
    for n, rec in enumerate(chunk.payload):
        where = f"{chunk.source}:{chunk.line(n)}"
        if chunk.kind == "jsonl":
            if not rec.strip():
                continue
            s = _to_text(rec, where, counts)
            try:
                obj = json.loads(s)
            except ValueError as e:
                counts.bad_json_lines += 1
                counts.note(f"{where}: not JSON ({e})")
                continue
            if not isinstance(obj, dict):
                counts.bad_json_lines += 1
                counts.note(f"{where}: not a JSON object")
                continue
            if text_field not in obj:
                raise DataError(f"{where}: no text field {text_field!r} in record "
                                f"(fields: {sorted(obj)[:20]}); choose one with --text-field")
            value = obj[text_field]
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: text field {text_field!r} is a {type(value).__name__}, "
                                "expected a string")
            text = _valid_str(value, where, counts) if value is not None else ""
        elif isinstance(rec, bytes):
            text = _to_text(rec, where, counts)
        elif rec is None:
            text = ""
        elif isinstance(rec, str):
            text = _valid_str(rec, where, counts)
        else:
            raise DataError(f"{where}: text field {text_field!r} is a {type(rec).__name__}, "
                            "expected a string")
        if not text.strip():
            counts.empty_documents += 1
            continue
        counts.documents += 1
        texts.append(text)
    return texts, counts


def is_validation_doc(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether ``prepare_dataset`` holds this document out (keyed hash of its text)."""
    if val_fraction <= 0:
        return False
    key = int(seed).to_bytes(8, "little")
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0 ** 64


def iter_documents(specs: Sequence[str], *, text_field: str = "text", txt_mode: str = "file",
                   hf_split: str = "train", counts: Counts | None = None,
                   val_fraction: float = 0.0, seed: int = 0) -> Iterator[str]:
    """The non-empty training documents of the inputs, in order, in this process (for tokenizer
    training): documents that ``prepare_dataset`` with the same ``val_fraction`` / ``seed`` would
    hold out, and the builtin corpus's validation topics, are left out."""
    counts = counts if counts is not None else Counts()
    inputs = resolve_inputs(specs, counts)
    for chunk in iter_chunks(inputs, text_field=text_field, txt_mode=txt_mode, hf_split=hf_split,
                             counts=counts):
        if chunk.split == "val":
            continue
        texts, c = decode_chunk(chunk, text_field)
        counts.add(c)
        if chunk.split is None and val_fraction > 0:
            texts = [t for t in texts if not is_validation_doc(t, val_fraction, seed)]
        yield from texts
