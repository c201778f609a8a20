"""Tests for the tokenizer and the data path (shards, manifest, sampler, builtin dataset)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megamor.data import (
    DataError,
    GlobalBatchSampler,
    PackedSplitWriter,
    ShardedTokenDataset,
    builtin_corpus,
    ensure_builtin_dataset,
    get_batch,
    load_manifest,
    prepare_dataset,
)
from megamor.data.shard_writer import commit_manifest
from megamor.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_bpe

SEQ = 32
VOCAB = 512


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    return builtin_corpus()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory, corpus) -> Tokenizer:
    return train_bpe(corpus[0], VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def small_docs(corpus) -> list[str]:
    return corpus[0][:8]


def _prepare(docs: list[str], tok: Tokenizer, out: Path, seq: int = SEQ):
    """`megamor data prepare` of `docs` (one .jsonl file beside `out`), train split only."""
    src = out.parent / f"docs-{len(docs)}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return prepare_dataset([src], tok, seq, out, samples_per_shard=64, val_fraction=0.0,
                           progress=False)


@pytest.fixture()
def data_dir(tmp_path: Path, tok: Tokenizer, small_docs: list[str]) -> Path:
    out = tmp_path / "data"
    _prepare(small_docs, tok, out)
    return out


def _all_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- corpus / tokenizer


def test_builtin_corpus_split(corpus):
    train, val = corpus
    assert 4 <= len(val) <= 8 and len(train) + len(val) >= 70
    assert not set(train) & set(val)
    assert builtin_corpus() == corpus


def test_tokenizer_roundtrip_and_reload(tmp_path, tok, corpus):
    text = corpus[1][0] + " ünïcödé ✓ \t\n  x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "a"]) == [ids, tok.encode("a")]
    assert tok.vocab_size == VOCAB and tok.eos_id != tok.pad_id
    saved = tok.save(tmp_path / "t")
    for path in (saved, saved / "tokenizer.json"):
        again = load_tokenizer(path)
        assert again.fingerprint == tok.fingerprint and len(again.fingerprint) == 64
        assert (again.eos_id, again.pad_id, again.vocab_size) == (tok.eos_id, tok.pad_id, VOCAB)
        assert again.encode(text) == ids


def test_train_bpe_deterministic(tmp_path, corpus):
    a = train_bpe(corpus[0][:20], 300, tmp_path / "a")
    b = train_bpe(corpus[0][:20], 300, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert a.fingerprint == b.fingerprint


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match=str(bad)):
        load_tokenizer(bad.parent)


# ----------------------------------------------------------------------------- shards


def test_roundtrip_shards(data_dir, tok, small_docs):
    m = load_manifest(data_dir)
    ds = ShardedTokenDataset(data_dir, "train", expect_seq_length=SEQ, expect_fingerprint=tok.fingerprint)
    assert len(ds) == m.splits["train"].num_samples > 64  # spans several shards
    assert len(m.splits["train"].shards) == -(-len(ds) // 64)
    samples = [ds[i] for i in range(len(ds))]
    assert all(s.dtype == torch.int64 and s.shape == (SEQ + 1,) for s in samples)
    for a, b in zip(samples, samples[1:]):  # Megatron-style one-token overlap
        assert a[-1] == b[0]
    stream = torch.cat([samples[0]] + [s[1:] for s in samples[1:]]).tolist()
    text = tok.decode(stream)
    full = "".join(d + "<|endoftext|>" for d in small_docs)
    assert full.startswith(text) and len(full) - len(text) < 40 * SEQ  # only the tail is dropped
    assert ds[-1].equal(samples[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_prepare_idempotent_and_deterministic(tmp_path, data_dir, tok, small_docs):
    first = _all_bytes(data_dir)
    mtime = (data_dir / "manifest.json").stat().st_mtime_ns
    assert _prepare(small_docs, tok, data_dir).up_to_date  # skip path
    assert (data_dir / "manifest.json").stat().st_mtime_ns == mtime
    assert _all_bytes(data_dir) == first
    other = tmp_path / "other"
    _prepare(small_docs, tok, other)  # fresh write
    assert _all_bytes(other) == first
    # A changed input rewrites the split and removes stale shards.
    _prepare(small_docs[:2], tok, data_dir)
    m = load_manifest(data_dir)
    assert sorted(p.name for p in (data_dir / "train").iterdir()) == \
        [Path(s.file).name for s in m.splits["train"].shards]
    assert not any(".tmp" in p.name for p in data_dir.rglob("*"))


def test_multiple_splits_share_manifest(data_dir, tok, corpus):
    # Another split written beside `train` the way `megamor data prepare` writes each split.
    writer = PackedSplitWriter(data_dir, "extra", SEQ, 64, tok.eos_id)
    docs = tok.encode_batch(corpus[1])
    writer.add_documents(np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]),
                         [len(d) for d in docs])
    commit_manifest(data_dir, load_manifest(data_dir), {"extra": writer.finish("src")}, tok, SEQ)
    m = load_manifest(data_dir)
    assert set(m.splits) == {"train", "extra"}
    assert len(ShardedTokenDataset(data_dir, "extra")) == m.splits["extra"].num_samples > 0
    with pytest.raises(DataError, match="fresh out_dir"):
        _prepare(corpus[1], tok, data_dir, seq=SEQ * 2)
    with pytest.raises(DataError, match="no split 'test'"):
        ShardedTokenDataset(data_dir, "test")


def _shard(data_dir: Path, j: int = 1) -> Path:
    return data_dir / "train" / f"shard-{j:06d}.tar"


def test_corrupt_shard(data_dir):
    path = _shard(data_dir)
    raw = bytearray(path.read_bytes())
    raw[2000:2004] = bytes(b ^ 0xFF for b in raw[2000:2004])
    path.write_bytes(bytes(raw))
    ds = ShardedTokenDataset(data_dir)
    ds[0]  # shard 0 is fine
    with pytest.raises(DataError, match=str(path) + ".*sha256"):
        ds[64]


def test_truncated_shard(data_dir):
    path = _shard(data_dir)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=str(path) + ".*truncated"):
        ShardedTokenDataset(data_dir)[64]
    # Even without checksum verification, a truncated tar is caught by the size check.
    with pytest.raises(DataError, match=str(path)):
        ShardedTokenDataset(data_dir, verify_checksums=False)[64]


def test_missing_shard(data_dir):
    path = _shard(data_dir)
    path.unlink()
    with pytest.raises(DataError, match="missing: " + str(path)):
        ShardedTokenDataset(data_dir)[64]


def test_manifest_mismatch_and_validation(data_dir, tok):
    mpath = data_dir / "manifest.json"
    with pytest.raises(DataError, match=f"{mpath}.*seq_length.*{SEQ}.*{SEQ + 1}"):
        ShardedTokenDataset(data_dir, expect_seq_length=SEQ + 1)
    with pytest.raises(DataError, match=f"{mpath}.*fingerprint.*{tok.fingerprint}.*{'0' * 64}"):
        ShardedTokenDataset(data_dir, expect_fingerprint="0" * 64)
    raw = json.loads(mpath.read_text())
    del raw["seq_length"]
    mpath.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=f"{mpath}.*'seq_length'"):
        load_manifest(mpath)
    raw["seq_length"] = SEQ
    raw["splits"]["train"]["num_samples"] += 1
    mpath.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"splits\.train\.num_samples"):
        load_manifest(data_dir)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(data_dir / "nope")


def test_dataset_pickles_for_workers(data_dir):
    ds = ShardedTokenDataset(data_dir)
    x = ds[70]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[70].equal(x)


# ----------------------------------------------------------------------------- sampler


def _micro_steps(n, G, mbs, dp, seed, k, consumed=0):
    """Per micro-step, the union (rank order) of all dp ranks' micro-batches for batch k."""
    per_rank = []
    for r in range(dp):
        s = GlobalBatchSampler(n, G, mbs, dp, r, seed, consumed_samples=consumed)
        it = iter(s)
        for _ in range(k - consumed // G):
            next(it)
        per_rank.append(next(it))
    return [sum((per_rank[r][m] for r in range(dp)), []) for m in range(len(per_rank[0]))]


def test_sampler_dp_invariance_and_resume():
    n, G, seed = 103, 16, 7
    for k in range(0, 20):
        ref = _micro_steps(n, G, 4, 1, seed, k)
        assert _micro_steps(n, G, 2, 2, seed, k) == ref
        assert _micro_steps(n, G, 1, 4, seed, k) == ref
        assert _micro_steps(n, G, 4, 1, seed, k, consumed=(k // 3) * G) == ref
    single = GlobalBatchSampler(n, G, 8, 1, 0, seed)
    assert single.rank_micro_batches(5) == _micro_steps(n, G, 2, 4, seed, 5)
    assert sorted(single.global_batch(5).tolist()) == sorted(sum(single.rank_micro_batches(5), []))


def test_sampler_epochs_state_and_errors():
    n, G = 10, 4
    s = GlobalBatchSampler(n, G, 2, 1, 0, seed=3)
    it = iter(s)
    flat = [i for _ in range(10) for mb in next(it) for i in mb]  # 40 samples = 4 epochs
    epochs = [flat[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled
    assert s.global_batch(2).tolist() == flat[8:12]  # batch 2 straddles epochs 0 and 1
    assert s.epoch_of_batch(2) == 0 and s.epoch_of_batch(3) == 1
    state = s.state_dict()
    assert state["consumed_samples"] == 40
    t = GlobalBatchSampler(n, G, 2, 1, 0, seed=3)
    t.load_state_dict(state)
    assert next(iter(t)) == next(it)
    assert GlobalBatchSampler(n, G, 2, 1, 0, seed=4).global_batch(0).tolist() != flat[:4]
    with pytest.raises(ValueError, match="multiple"):
        GlobalBatchSampler(n, G, 2, 1, 0, 3, consumed_samples=6)
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(n, 6, 2, 2, 0, 3)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(n, G, 2, 1, 0, seed=9).load_state_dict(state)


def test_get_batch(data_dir):
    ds = ShardedTokenDataset(data_dir)
    b = get_batch(ds, [3, 65, 0])
    assert b["tokens"].shape == b["labels"].shape == (3, SEQ)
    assert b["tokens"].dtype == torch.long
    assert b["tokens"][1].equal(ds[65][:-1]) and b["labels"][1].equal(ds[65][1:])


# ----------------------------------------------------------------------------- builtin


def test_ensure_builtin_dataset(tmp_path):
    root = ensure_builtin_dataset(tmp_path / "b", seq_length=64, vocab_size=512)
    tok = load_tokenizer(root / "tokenizer")
    m = load_manifest(root)
    assert m.tokenizer_fingerprint == tok.fingerprint and m.vocab_size == 512
    before = _all_bytes(root)
    assert ensure_builtin_dataset(root, 64, 512) == root and _all_bytes(root) == before
    for split in ("train", "val"):
        ds = ShardedTokenDataset(root, split, expect_seq_length=64, expect_fingerprint=tok.fingerprint)
        assert len(ds) > 0 and int(ds[len(ds) - 1].max()) < 512
    with pytest.raises(DataError, match="seq_length=64.*requested seq_length=128"):
        ensure_builtin_dataset(root, 128, 512)
    # An interrupted build (no manifest) is redone.
    (root / "manifest.json").unlink()
    shutil.rmtree(root / "val")
    ensure_builtin_dataset(root, 64, 512)
    assert _all_bytes(root) == before


def test_ensure_builtin_dataset_concurrent(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    root = tmp_path / "c"
    procs = [ctx.Process(target=ensure_builtin_dataset, args=(root, 64, 512)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(ShardedTokenDataset(root, "val")) > 0
    assert not any(".tmp" in p.name for p in root.rglob("*"))
