"""Tests for `megamor tokenizer` / `megamor data prepare`, blending and the batch loader."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from megamor.cli import main
from megamor.data import (
    BatchLoader,
    BlendedDataset,
    DataError,
    GlobalBatchSampler,
    ShardedTokenDataset,
    builtin_corpus,
    load_manifest,
    open_training_data,
    parse_data_spec,
    prepare_dataset,
    resolve_inputs,
)
from megamor.data.sources import Counts, is_validation_doc, iter_documents
from megamor.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_from_checkpoint,
    load_tokenizer,
    save_with_checkpoint,
    train_bpe,
)

SEQ = 32
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    train, val = builtin_corpus()
    return [d[:3000] for d in train[:40]] + ["ünïcödé ✓ \t tabs\n\nand  spaces  ", "x"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, docs) -> Tokenizer:
    return train_bpe(docs, 400, tmp_path_factory.mktemp("tok"))


def _jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _stream(ds: ShardedTokenDataset) -> list[int]:
    """The packed token stream back from the samples (consecutive samples overlap by one)."""
    if len(ds) == 0:
        return []
    return ds[0].tolist() + [t for i in range(1, len(ds)) for t in ds[i].tolist()[1:]]


def _all_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _check_roundtrip(ds: ShardedTokenDataset, tok: Tokenizer, split_docs: list[str]) -> None:
    """Prepared tokens decode back to the documents joined by EOS (only the tail is cut)."""
    stream = _stream(ds)
    expected = [t for d in split_docs for t in tok.encode(d) + [tok.eos_id]]
    assert stream == expected[:len(stream)] and len(expected) - len(stream) <= SEQ
    parts = tok.decode(stream).split(EOS)
    assert parts[:-1] == split_docs[:len(parts) - 1]
    assert split_docs[len(parts) - 1].startswith(parts[-1].rstrip("\ufffd"))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_cli_train_import_info(tmp_path, docs, capsys):
    src = _jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "t"
    assert main(["tokenizer", "train", str(src), "--out", str(out), "--vocab-size", "300",
                 "--special-tokens", "<|eos|>,<|pad|>,<|sep|>"]) == 0
    t = load_tokenizer(out)
    assert (t.eos_token, t.eos_id, t.pad_token, t.pad_id, t.vocab_size) == ("<|eos|>", 0, "<|pad|>", 1, 300)
    assert main(["tokenizer", "info", str(out), "--encode", "héllo wörld"]) == 0
    assert "round trip  True" in capsys.readouterr().out
    # A Hugging Face directory: tokenizer.json + tokenizer_config.json naming the EOS token.
    hf = tmp_path / "hf"
    hf.mkdir()
    t.hf.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|sep|>", "special": True}, "pad_token": None}))
    h = load_tokenizer(hf)
    assert (h.eos_token, h.eos_id, h.pad_id) == ("<|sep|>", 2, 1) and h.fingerprint == t.fingerprint
    assert load_tokenizer(hf, eos_token="<|eos|>", pad_token="<|pad|>").eos_id == 0
    assert main(["tokenizer", "import", str(hf), "--out", str(tmp_path / "imp")]) == 0
    assert load_tokenizer(tmp_path / "imp").eos_token == "<|sep|>"
    # GPT-2 style: vocab.json + merges.txt only.
    g = tmp_path / "gpt2"
    g.mkdir()
    t.hf.model.save(str(g))
    assert load_tokenizer(g, eos_token="<|eos|>").encode(docs[0]) == t.encode(docs[0])
    # Nothing names an EOS that exists.
    (hf / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match="cannot tell the EOS token"):
        load_tokenizer(hf)
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(hf, eos_token="<nope>")


def test_tokenizer_travels_with_checkpoint(tmp_path, tok, docs):
    ckpt = tmp_path / "ckpt"
    save_with_checkpoint(tok, ckpt)
    save_with_checkpoint(tok, ckpt)  # idempotent
    assert load_from_checkpoint(ckpt, tok.fingerprint).encode(docs[1]) == tok.encode(docs[1])
    other = train_bpe(docs[:5], 300, tmp_path / "other")
    with pytest.raises(TokenizerError, match="checkpoint from another tokenizer"):
        save_with_checkpoint(other, ckpt)


# ----------------------------------------------------------------------------- prepare


@pytest.fixture()
def corpus_dir(tmp_path, docs) -> tuple[Path, list[str], dict]:
    """Every supported format, plus bad input; returns (dir, expected docs in order, counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    expected: list[str] = []
    # Sorted walk order: a.jsonl, b.jsonl.gz, c.jsonl.zst, d.txt, e.txt.gz, f.txt, g.txt, sub/...
    _jsonl(d / "a.jsonl", docs[:8])
    with open(d / "a.jsonl", "a") as f:
        f.write("{broken\n\n" + json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
    expected += docs[:8]
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": x}) + "\n" for x in docs[8:14]))
    expected += docs[8:14]
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": x}) + "\n" for x in docs[14:20]).encode()))
    expected += docs[14:20]
    (d / "d.txt").write_text(docs[-2])
    expected.append(docs[-2])
    with gzip.open(d / "e.txt.gz", "wt") as f:
        f.write(docs[21])
    expected.append(docs[21])
    (d / "f.txt").write_bytes(b"latin-1 caf\xe9 here")
    expected.append("latin-1 caf\ufffd here")
    (d / "g.txt").write_bytes(b"")
    (d / "notes.md").write_text("ignored")
    pq.write_table(pa.table({"text": docs[22:30] + [None], "n": list(range(9))}), d / "sub" / "p.parquet")
    expected += docs[22:30]
    return d, expected, {"documents": len(expected), "empty_documents": 3, "non_utf8_documents": 1,
                         "bad_json_lines": 1, "empty_files": 1, "ignored_files": 1}


def _prepare(inputs, tok, out, **kw):
    kw.setdefault("samples_per_shard", 16)
    kw.setdefault("workers", 0)
    return prepare_dataset([str(i) for i in inputs], tok, SEQ, out, **kw)


def test_prepare_all_formats_roundtrip(tmp_path, corpus_dir, tok, docs):
    import datasets

    d, expected, want = corpus_dir
    hf_dir = tmp_path / "hf_ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[30:36]}),
                          "test": datasets.Dataset.from_dict({"text": ["not this split"]})}
                         ).save_to_disk(str(hf_dir))
    expected = expected + docs[30:36]
    out = tmp_path / "out"
    res = _prepare([d, hf_dir], tok, out, val_fraction=0.25, chunk_bytes=2048)
    assert not res.up_to_date and res.tokens > 0
    got = {k: getattr(res.counts, k) for k in want}
    assert got == {**want, "documents": len(expected)}
    assert res.counts.files == 9  # 8 files in the directory tree + the saved dataset
    m = load_manifest(out)
    assert m.prepare["counts"]["documents"] == len(expected) and m.seq_length == SEQ
    assert any("f.txt:1: non-UTF-8" in e for e in m.prepare["counts"]["examples"])
    val_docs = [x for x in expected if is_validation_doc(x, 0.25)]
    train_docs = [x for x in expected if not is_validation_doc(x, 0.25)]
    assert 0 < len(val_docs) < len(train_docs)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ds = ShardedTokenDataset(out, split, expect_seq_length=SEQ, expect_fingerprint=tok.fingerprint)
        assert len(ds) > 0
        _check_roundtrip(ds, tok, split_docs)
    assert load_tokenizer(out / "tokenizer").fingerprint == tok.fingerprint
    assert "val:" in res.summary() and "1 bad JSON lines" in res.summary()


def test_inputs_globs_and_errors(tmp_path, corpus_dir, tok):
    import datasets
    import zstandard

    d, _, _ = corpus_dir
    out = tmp_path / "out"
    assert [Path(i.path).name for i in resolve_inputs([str(d / "*.txt*")])] == \
        ["d.txt", "e.txt.gz", "f.txt", "g.txt"]
    with pytest.raises(DataError, match="input not found: .*nope"):
        resolve_inputs([str(tmp_path / "nope")])
    with pytest.raises(DataError, match="matches no files"):
        resolve_inputs([str(d / "*.xyz")])
    with pytest.raises(DataError, match=r"notes\.md: unsupported format"):
        resolve_inputs([str(d / "notes.md")])
    # Truncated compressed inputs stop with the file's name.
    raw = b'{"text": "abc def"}\n' * 2000
    gz, zst = tmp_path / "t.jsonl.gz", tmp_path / "t.jsonl.zst"
    packed_gz, packed_zst = gzip.compress(raw), zstandard.ZstdCompressor().compress(raw)
    gz.write_bytes(packed_gz[:len(packed_gz) // 2])
    zst.write_bytes(packed_zst[:len(packed_zst) // 2])
    with pytest.raises(DataError, match=f"{gz}: cannot read gz file"):
        _prepare([gz], tok, out)
    with pytest.raises(DataError, match=f"{zst}: cannot read zst file"):
        _prepare([zst], tok, out)
    # Unknown text field: the file (and line) and the fields that exist.
    with pytest.raises(DataError, match=r"a\.jsonl:1: no text field 'body' in record \(fields: \['id', 'text'\]\)"):
        _prepare([d / "a.jsonl"], tok, out, text_field="body")
    with pytest.raises(DataError, match=r"p\.parquet: no text field 'body' \(columns: \['text', 'n'\]\)"):
        _prepare([d / "sub" / "p.parquet"], tok, out, text_field="body")
    ds_dir = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["a b c"]}).save_to_disk(str(ds_dir))
    with pytest.raises(DataError, match=f"{ds_dir}: no text field 'text' \\(columns: \\['content'\\]\\)"):
        _prepare([ds_dir], tok, out)
    dict_dir = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(dict_dir))
    with pytest.raises(DataError, match=f"{dict_dir}: saved DatasetDict has no split 'validation'"):
        _prepare([dict_dir], tok, out, hf_split="validation")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=f"{bad}:2: text field 'text' is a int"):
        _prepare([bad], tok, out)
    with pytest.raises(DataError, match="no documents"):
        _prepare([d / "g.txt"], tok, out)


def test_txt_modes(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"first para\nline two\n\n\nsecond \xff para\n\nthird\n")
    counts = Counts()
    assert list(iter_documents([str(f)], txt_mode="paragraph", counts=counts)) == \
        ["first para\nline two", "second \ufffd para", "third"]
    assert counts.examples == [f"{f}:5: non-UTF-8 bytes replaced (invalid start byte at byte 7)"]
    counts = Counts()
    assert list(iter_documents([str(f)], txt_mode="line", counts=counts)) == \
        ["first para", "line two", "second \ufffd para", "third"]
    assert (counts.empty_documents, counts.documents, counts.non_utf8_documents) == (3, 4, 1)
    assert list(iter_documents([str(f)])) == [f.read_bytes().decode("utf-8", "replace")]


def test_prepare_workers_deterministic_idempotent(tmp_path, corpus_dir, tok, capsys):
    d, _, _ = corpus_dir
    a, b = tmp_path / "a", tmp_path / "b"
    _prepare([d], tok, a, workers=0, chunk_bytes=1024)
    _prepare([d], tok, b, workers=2, chunk_bytes=1024, progress=True)
    assert "prepare" in capsys.readouterr().err  # the progress bar
    first = _all_bytes(a)
    assert first == _all_bytes(b)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    again = _prepare([d], tok, a)
    assert again.up_to_date and "up to date" in again.summary()
    assert (a / "manifest.json").stat().st_mtime_ns == mtime and _all_bytes(a) == first
    assert not _prepare([d], tok, a, force=True).up_to_date
    assert _all_bytes(a) == first
    # Another input rewrites both splits and removes stale shards.
    _prepare([d / "a.jsonl"], tok, a, val_fraction=0.0)
    m = load_manifest(a)
    assert set(m.splits) == {"train"} and not (a / "val").exists()
    assert sorted(p.name for p in (a / "train").iterdir()) == [Path(s.file).name for s in m.splits["train"].shards]
    assert not any(".tmp" in p.name for p in a.rglob("*"))


def test_keep_boundaries(tmp_path, tok, docs):
    docs = ["a", "b c", "d", "short one", "e"] + docs
    src = _jsonl(tmp_path / "x.jsonl", docs)
    out, plain = tmp_path / "o", tmp_path / "p"
    _prepare([src], tok, out, keep_boundaries=True, val_fraction=0.0)
    _prepare([src], tok, plain, val_fraction=0.0)
    ds, ds_plain = ShardedTokenDataset(out), ShardedTokenDataset(plain)
    assert ds.has_doc_starts and load_manifest(out).splits["train"].doc_starts
    lengths = [len(tok.encode(x)) + 1 for x in docs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    multi = 0
    for i in range(len(ds)):
        a = i * SEQ
        want = (starts[(starts >= a) & (starts <= a + SEQ)] - a).tolist()
        assert ds.doc_starts(i).tolist() == want
        multi += len(want) > 1
        assert ds[i].equal(ds_plain[i])  # the tokens do not change
    assert multi > 0
    with pytest.raises(DataError, match="without document boundaries"):
        ds_plain.doc_starts(0)


def test_corrupt_shard_policy(tmp_path, tok, docs, caplog):
    src = _jsonl(tmp_path / "x.jsonl", docs)
    out = tmp_path / "o"
    _prepare([src], tok, out, val_fraction=0.0)
    ref = ShardedTokenDataset(out)
    ref_samples = [ref[i] for i in range(len(ref))]
    assert len(ref.info.shards) >= 5
    bad = out / "train" / "shard-000001.tar"
    raw = bytearray(bad.read_bytes())
    raw[3000:3004] = bytes(x ^ 0xFF for x in raw[3000:3004])
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"shard {bad}: sha256 .* \\(corrupt\\)"):
        ShardedTokenDataset(out)[16]
    skip = ShardedTokenDataset(out, on_corrupt="skip")
    missing = out / "train" / "shard-000003.tar"
    missing.unlink()
    with caplog.at_level(logging.WARNING, logger="megamor.data"):
        got = [skip[i] for i in range(len(skip))]
        got += [skip[i] for i in range(16, 32)]  # already known: no new warning
    assert caplog.text.count("SKIPPING corrupt shard") == 2
    assert str(bad) in caplog.text and str(missing) in caplog.text
    assert sorted(skip.skipped_shards) == sorted([str(bad), str(missing)])
    assert skip.substituted_samples == 16 * 3
    assert got[16].equal(ref_samples[32]) and got[48].equal(ref_samples[64])
    assert all(got[i].equal(ref_samples[i]) for i in range(len(ref)) if not (16 <= i < 32 or 48 <= i < 64))
    with pytest.raises(ValueError, match="on_corrupt"):
        ShardedTokenDataset(out, on_corrupt="ignore")


# ----------------------------------------------------------------------------- blending, loader


@pytest.fixture()
def two_dirs(tmp_path, tok, docs) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    _prepare([_jsonl(tmp_path / "a.jsonl", docs[:4])], tok, a, val_fraction=0.0)
    _prepare([_jsonl(tmp_path / "b.jsonl", docs[4:12])], tok, b, val_fraction=0.0)
    return a, b


def test_open_training_data_mismatches(tmp_path, two_dirs, tok, docs):
    a, b = two_dirs
    assert isinstance(open_training_data(str(a), SEQ, tok.fingerprint), ShardedTokenDataset)
    with pytest.raises(DataError, match=f"{a}/manifest.json: seq_length mismatch: manifest has {SEQ}, expected 64"):
        open_training_data(str(a), 64)
    with pytest.raises(DataError, match=f"{a}/manifest.json: tokenizer fingerprint mismatch: manifest has "
                                        f"{tok.fingerprint}, expected {'0' * 64}"):
        open_training_data(str(a), SEQ, "0" * 64)
    other_tok = train_bpe(docs[:5], 300, tmp_path / "other_tok")
    c = tmp_path / "c"
    prepare_dataset([str(tmp_path / "b.jsonl")], other_tok, SEQ, c, val_fraction=0.0)
    with pytest.raises(DataError, match=f"{c}/manifest.json: tokenizer fingerprint mismatch.*first blended dataset {a}"):
        open_training_data(f"{a},{c}", SEQ)
    short = tmp_path / "short"
    prepare_dataset([str(tmp_path / "b.jsonl")], tok, 16, short, val_fraction=0.0)
    with pytest.raises(DataError, match=f"{short}/manifest.json: seq_length mismatch: manifest has 16, expected {SEQ}"):
        open_training_data(f"0.5:{a},0.5:{short}", SEQ)
    with pytest.raises(DataError, match="no split 'val'"):
        open_training_data(str(a), SEQ, split="val")


def test_parse_data_spec():
    c = parse_data_spec(" 0.7:/data/a , 3e-1:/data/b:c ")
    assert [(x.weight, str(x.path)) for x in c] == [(0.7, "/data/a"), (0.3, "/data/b:c")]
    assert [x.weight for x in parse_data_spec("/a,/b")] == [None, None]
    assert [x.weight for x in parse_data_spec([(2, "/x"), {"weight": 1, "path": "/y"}, "4:/z"])] == [2, 1, 4]
    with pytest.raises(DataError, match="every component or to none"):
        parse_data_spec("0.7:/a,/b")
    with pytest.raises(DataError, match="must be > 0"):
        parse_data_spec("0:/a")
    with pytest.raises(DataError, match="no dataset"):
        parse_data_spec(" , ")


def test_blended_dataset(two_dirs, tok):
    a, b = two_dirs
    A, B = ShardedTokenDataset(a), ShardedTokenDataset(b)
    spec = f"0.9:{a},0.1:{b}"
    bl = open_training_data(spec, SEQ, tok.fingerprint, seed=3)
    assert isinstance(bl, BlendedDataset)
    n = len(A) + len(B)
    assert len(bl) == n == bl.counts.sum() and abs(bl.counts[0] - 0.9 * n) <= 0.5
    is_a = bl.dataset_index == 0
    assert np.all(np.abs(np.cumsum(is_a) - 0.9 * np.arange(1, n + 1)) <= 1)  # evenly spread
    for i in (0, 1, 7, n - 1):
        d, j = bl.source(i)
        assert bl[i].equal((A, B)[d][j])
    a_idx = bl.sample_index[is_a]  # up-weighted: full passes, each a fresh permutation
    assert len(a_idx) > 2 * len(A)
    assert sorted(a_idx[:len(A)]) == list(range(len(A))) and sorted(a_idx[len(A):2 * len(A)]) == list(range(len(A)))
    assert a_idx[:len(A)].tolist() != a_idx[len(A):2 * len(A)].tolist()
    b_idx = bl.sample_index[~is_a]  # down-weighted: a subset without repeats
    assert len(set(b_idx.tolist())) == len(b_idx) < len(B)
    same = open_training_data(spec, SEQ, seed=3)
    assert np.array_equal(same.sample_index, bl.sample_index) and np.array_equal(same.dataset_index, bl.dataset_index)
    assert not np.array_equal(open_training_data(spec, SEQ, seed=4).sample_index, bl.sample_index)
    cat = open_training_data(f"{a},{b}", SEQ)  # no weights: proportional to size
    assert cat.counts.tolist() == [len(A), len(B)]
    assert len(open_training_data(f"1:{a},1:{b}", SEQ, num_samples=100)) == 100


class _Recording(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds, self.seen = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.ds[i]


def _global_batches(ds, dp: int, steps: int, start: int = 0, workers: int = 0, G: int = 16) -> list[torch.Tensor]:
    """Global batch k for k in [start, start+steps), assembled from all dp ranks' micro-batches."""
    mbs = G // (2 * dp)  # two micro-batches per step whatever dp is
    per_rank = []
    for r in range(dp):
        s = GlobalBatchSampler(len(ds), G, mbs, dp, r, seed=11, consumed_samples=start * G)
        it = iter(BatchLoader(ds, s, num_workers=workers))
        per_rank.append([next(it) for _ in range(steps)])
        assert s.consumed_samples == (start + steps) * G
    return [torch.cat([per_rank[r][k][m]["tokens"] for m in range(2) for r in range(dp)])
            for k in range(steps)]


def test_global_batches_dp_workers_resume(two_dirs, tok):
    a, b = two_dirs
    bl = open_training_data(f"0.6:{a},0.4:{b}", SEQ, tok.fingerprint, seed=5)
    steps = len(bl) // 16 + 3  # crosses an epoch boundary (reshuffled)
    ref = _global_batches(bl, 1, steps)
    assert all(x.shape == (16, SEQ) for x in ref)
    for dp in (2, 4):
        assert all(x.equal(y) for x, y in zip(_global_batches(bl, dp, steps), ref))
    assert all(x.equal(y) for x, y in zip(_global_batches(bl, 2, 4, start=steps - 4, workers=2), ref[-4:]))
    for k in range(steps):  # stop at any step and resume from the consumed-sample count
        assert _global_batches(bl, 2, 1, start=k)[0].equal(ref[k])
    # Resuming reads only the resumed batch's samples, not everything before it: on the
    # caller's thread (prefetch_steps=0) exactly its samples; prefetching, its samples first,
    # then those of the steps after it.
    rec = _Recording(bl)
    s = GlobalBatchSampler(len(rec), 16, 8, 1, 0, seed=11, consumed_samples=(steps - 1) * 16)
    batch = next(iter(BatchLoader(rec, s, prefetch_steps=0)))
    assert sorted(rec.seen) == sorted(s.global_batch(steps - 1).tolist())
    assert torch.cat([mb["tokens"] for mb in batch]).equal(ref[-1])
    rec = _Recording(bl)
    with BatchLoader(rec, s, prefetch_steps=2) as loader:
        batch = loader.get(steps - 1)
    assert sorted(rec.seen[:16]) == sorted(s.global_batch(steps - 1).tolist())
    assert set(rec.seen) <= set(np.concatenate([s.global_batch(k) for k in range(steps - 1, steps + 2)]).tolist())
    assert torch.cat([mb["tokens"] for mb in batch]).equal(ref[-1])
    state = s.state_dict()
    t = GlobalBatchSampler(len(bl), 16, 8, 1, 0, seed=11)
    t.load_state_dict(state)
    assert t.consumed_samples == steps * 16


class _Gated(torch.utils.data.Dataset):
    """A dataset whose reads of the samples in ``blocked`` wait for ``gate``: what a read of
    a slow file system looks like to the loader, made deterministic. Records (sample, thread)."""

    def __init__(self, ds, blocked=(), fail=None):
        self.ds, self.blocked, self.fail = ds, set(blocked), fail
        self.gate, self.seen = threading.Event(), []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.seen.append((int(i), threading.current_thread().name))
        if int(i) in self.blocked:
            self.gate.wait()
        if self.fail is not None and int(i) == self.fail[0]:
            raise self.fail[1]
        return self.ds[i]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("megamor-prefetch")]


def test_prefetching_loader(two_dirs, tok):
    """BatchLoader.get(k), as the trainer calls it: the same batches as reading on the caller's
    thread whatever the timing, steps after k read in the background while the caller holds k,
    jumps restart the reading at the asked step, and close() ends the thread even while a read
    hangs."""
    a, b = two_dirs
    bl = open_training_data(f"0.6:{a},0.4:{b}", SEQ, tok.fingerprint, seed=5)
    s = GlobalBatchSampler(len(bl), 16, 4, 2, 1, seed=11)  # rank 1 of 2, 2 micro-batches/step
    steps = len(bl) // 16 + 3
    ref = [BatchLoader(bl, s, prefetch_steps=0).get(k) for k in range(steps)]

    def same(x, y):
        return len(x) == len(y) == 2 and all(
            p["tokens"].equal(q["tokens"]) and p["labels"].equal(q["labels"]) for p, q in zip(x, y))

    # Step 1's first sample is held back: get(0) returns while the thread waits in step 1;
    # get(1) waits for it (and says so in wait_s); the order never depends on the timing.
    first_of_1 = s.rank_micro_batches(1)[0][0]
    gated = _Gated(bl, blocked={first_of_1})
    loader = BatchLoader(gated, s, prefetch_steps=2)
    assert same(loader.get(0), ref[0])
    deadline = time.monotonic() + 60
    while first_of_1 not in [i for i, _ in gated.seen] and time.monotonic() < deadline:
        time.sleep(0.01)  # step 1 is being read by now, in the background
    assert {name for _, name in gated.seen} == {"megamor-prefetch-from-0"}
    threading.Timer(0.3, gated.gate.set).start()
    assert same(loader.get(1), ref[1]) and loader.wait_s > 0.1
    assert all(same(loader.get(k), ref[k]) for k in range(2, steps))  # crosses an epoch
    # A jump (a resume at step 3) restarts the reading there; going back works too.
    assert same(loader.get(3), ref[3]) and same(loader.get(4), ref[4])
    assert same(loader.get(0), ref[0])
    loader.close()
    assert not _prefetch_threads()

    # With DataLoader workers behind the thread: the same batches.
    with BatchLoader(bl, s, num_workers=2) as loader:
        assert all(same(loader.get(k), ref[k]) for k in range(4, 8))

    # A read that never returns (a dead file system): close() gives up on it after its
    # timeout; the thread is a daemon, so the process can still exit.
    stuck = _Gated(bl, blocked={first_of_1})
    loader = BatchLoader(stuck, s)
    loader.get(0)
    t0 = time.monotonic()
    loader.close(timeout=0.2)
    assert time.monotonic() - t0 < 30
    (thread,) = _prefetch_threads()
    assert thread.daemon
    stuck.gate.set()
    thread.join(30)
    assert not _prefetch_threads()

    # Garbage collection stops the thread too (the thread keeps no reference to the loader).
    loader = BatchLoader(bl, s)
    loader.get(0)
    del loader
    gc.collect()
    deadline = time.monotonic() + 30
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _prefetch_threads()


def test_prefetch_errors_reach_the_caller(tmp_path, tok, docs):
    """A corrupt shard read by the prefetch thread: the get() of the step that needs it raises
    the reader's DataError on the caller's thread (the same one-line message, naming the file);
    the steps before it are delivered; nothing hangs and no thread is left."""
    src = _jsonl(tmp_path / "x.jsonl", docs)
    out = tmp_path / "o"
    _prepare([src], tok, out, val_fraction=0.0)
    bad = out / "train" / "shard-000001.tar"
    raw = bytearray(bad.read_bytes())
    raw[3000:3004] = bytes(x ^ 0xFF for x in raw[3000:3004])
    bad.write_bytes(bytes(raw))
    ds = ShardedTokenDataset(out)

    def first_bad(s):  # the first step that reads a sample of shard 1
        return next(k for k in range(len(ds)) if any(16 <= i < 32 for i in s.global_batch(k)))

    s = next(s for s in (GlobalBatchSampler(len(ds), 4, 2, 1, 0, seed=seed) for seed in range(100))
             if first_bad(s) >= 2)
    first_bad = first_bad(s)
    loader = BatchLoader(ds, s, prefetch_steps=2)
    for k in range(first_bad):
        loader.get(k)
    with pytest.raises(DataError, match=f"^shard {bad}: sha256 .* \\(corrupt\\)$") as err:
        loader.get(first_bad)
    # Its traceback (in the rank's log) goes through the read on the prefetch thread.
    assert "_read_step" in [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert not _prefetch_threads()
    with pytest.raises(DataError, match="corrupt"):  # asked again: read again, same error
        loader.get(first_bad)
    assert not _prefetch_threads()
    # Any exception of a read travels the same way (here not a DataError).
    boom = _Gated(ds, fail=(s.global_batch(0)[3], KeyError("boom")))
    with pytest.raises(KeyError, match="boom"):
        BatchLoader(boom, s).get(0)


# ----------------------------------------------------------------------------- CLI


def test_cli_prepare_and_inspect(tmp_path, tok, docs, capsys):
    src = _jsonl(tmp_path / "x.jsonl", docs)
    tok_dir = tok.save(tmp_path / "tk")
    out = tmp_path / "o"
    args = ["data", "prepare", str(src), "--out", str(out), "--seq-length", str(SEQ), "--tokenizer",
            str(tok_dir), "--workers", "2", "--no-progress", "--val-fraction", "0.2", "--samples-per-shard", "64"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "val:" in text and "per worker" in text
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main(["data", "inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verify train/shard-000000.tar: ok" in text
    n = text.count(": ok")  # one summary line at the end (issue 19 item 7)
    assert text.splitlines()[-1] == (f"verified {n} shard(s) of 1 dataset(s): all intact (size, "
                                     f"sha256, tar)")
    assert main(["data", "inspect", str(out), "--show", "1"]) == 0
    assert "--- sample 0 ---" in capsys.readouterr().out
    assert main(["data", "inspect", f"0.5:{out},0.5:{out}"]) == 0
    assert "blend of" in capsys.readouterr().out
    shard = out / "val" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"1 of \d+ shard\(s\) failed verification"):
        main(["data", "inspect", str(out), "--verify"])
    assert "truncated" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"megamor: data error: .*x\.jsonl:1: no text field 'body'"):
        main(args[:4] + [str(tmp_path / "o2")] + args[5:] + ["--text-field", "body"])
    o3 = tmp_path / "o3"
    assert main(["data", "prepare", str(src), "--out", str(o3), "--seq-length", str(SEQ),
                 "--vocab-size", "300", "--workers", "0"]) == 0
    assert load_tokenizer(o3 / "tokenizer").vocab_size == 300
    assert load_manifest(o3).tokenizer_fingerprint == load_tokenizer(o3 / "tokenizer").fingerprint


def test_quickstart_dataset_is_the_prepare_path(tmp_path):
    """The embedded corpus goes through `megamor data prepare`: the CLI rebuilds it byte for byte."""
    from megamor.data import ensure_builtin_dataset

    root = ensure_builtin_dataset(tmp_path / "quickstart", 64, 512)
    out = tmp_path / "cli"
    assert main(["data", "prepare", "builtin", "--out", str(out), "--seq-length", "64", "--vocab-size",
                 "512", "--val-fraction", "0", "--workers", "2", "--no-progress"]) == 0
    want = _all_bytes(root)
    want.pop(".lock")
    assert _all_bytes(out) == want
    assert set(load_manifest(out).splits) == {"train", "val"}


def test_data_with_the_previous_fingerprint_form_stays_usable(tmp_path, tok, docs):
    """Issue 19 item 6: the tokenizer fingerprint now covers only what changes token ids. Data
    prepared before (its manifest carries the hash of the whole tokenizer.json) still opens
    with the same tokenizer, and `data prepare` still finds it up to date."""
    from megamor.data.prepare import _fingerprint
    from megamor.data.shard_reader import ShardedTokenDataset

    src = _jsonl(tmp_path / "x.jsonl", docs)
    out = tmp_path / "o"
    args = dict(samples_per_shard=64, workers=0, progress=False)
    prepare_dataset([str(src)], tok, SEQ, out, **args)
    assert tok.fingerprint != tok.legacy_fingerprint
    # Rewrite the manifest as the previous megamor wrote it.
    raw = json.loads((out / "manifest.json").read_text())
    old_fp = _fingerprint([{k: v for k, v in i.items() if k != "path"}
                           for i in raw["prepare"]["inputs"]], raw["prepare"]["options"],
                          tok.legacy_fingerprint)
    raw["tokenizer_fingerprint"], raw["prepare"]["fingerprint"] = tok.legacy_fingerprint, old_fp
    for split in raw["splits"].values():
        split["source_sha256"] = old_fp
    (out / "manifest.json").write_text(json.dumps(raw))
    assert len(ShardedTokenDataset(out, "train", expect_fingerprint=tok.fingerprints)) > 0
    assert prepare_dataset([str(src)], tok, SEQ, out, **args).up_to_date
    # post-processors do not change token ids: not part of the fingerprint
    from tokenizers import Tokenizer as HFTokenizer, processors
    hf = HFTokenizer.from_str(tok.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    other = Tokenizer(hf, tok.eos_token, tok.pad_token)
    assert other.fingerprint == tok.fingerprint and other.legacy_fingerprint != tok.legacy_fingerprint
