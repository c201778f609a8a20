"""Self-contained demo dataset: BPE + packed shards built from ``builtin_corpus()``.

Takes about a second on 2 CPU cores; used by smoke tests and tiny runs.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from megamor.data.corpus import builtin_corpus
from megamor.data.prepare import prepare_dataset
from megamor.data.manifest import MANIFEST_FILE, DataError, load_manifest
from megamor.data.sources import BUILTIN
from megamor.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_bpe

TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def builtin_dataset_root(base: str | Path, seq_length: int, vocab_size: int) -> Path:
    """A per-configuration root under ``base``, so different configs never collide."""
    return Path(base) / f"builtin-v{vocab_size}-s{seq_length}"


def _check_complete(root: Path, seq_length: int, vocab_size: int) -> bool:
    """True if ``root`` holds a finished build for these settings; DataError if it holds another."""
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.exists():
        return False
    m = load_manifest(manifest_path)
    if not all(s in m.splits for s in SPLITS):
        return False
    try:
        tok: Tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    except TokenizerError:
        return False
    if m.seq_length != seq_length or m.vocab_size != vocab_size or tok.vocab_size != vocab_size:
        raise DataError(
            f"{manifest_path}: built for seq_length={m.seq_length}, vocab_size={m.vocab_size}, "
            f"requested seq_length={seq_length}, vocab_size={vocab_size}; use another root "
            f"(see builtin_dataset_root)")
    if not tok.matches(m.tokenizer_fingerprint):
        return False  # tokenizer rewritten after the shards: rebuild shards
    return True


def ensure_builtin_dataset(root: str | Path, seq_length: int, vocab_size: int,
                           samples_per_shard: int = 256) -> Path:
    """Build (if needed) tokenizer + train/val shards in ``root``; return ``root``.

    Process-safe: the check-and-build runs under an exclusive ``flock`` on
    ``root/.lock``; completeness is the manifest listing both splits (the
    manifest is written last, atomically).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _check_complete(root, seq_length, vocab_size):
                return root
            train_docs, _ = builtin_corpus()
            tok = train_bpe(train_docs, vocab_size, root / TOKENIZER_DIR)
            if tok.vocab_size != vocab_size:
                raise ValueError(f"builtin corpus only supports vocab_size <= {tok.vocab_size}, "
                                 f"requested {vocab_size}")
            # The same path as `megamor data prepare builtin`; the corpus fixes its own val split.
            # The manifest (both splits) is written last, atomically: it marks completion.
            prepare_dataset([BUILTIN], tok, seq_length, root, samples_per_shard=samples_per_shard,
                            val_fraction=0.0, workers=0, progress=False)
            return root
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
