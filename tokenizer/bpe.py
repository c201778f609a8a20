"""Byte-level BPE tokenizer: training, loading and a small wrapper.

The HF ``tokenizers`` library does the work; this module pins down the
configuration (byte-level pre-tokenizer and decoder, no normalizer, no
post-processor) so that ``decode(encode(text)) == text`` for any text, and it
stores the few facts the training stack needs (EOS/PAD tokens) next to the
standard ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "megamor_tokenizer.json"
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical_json(text: str) -> str:
    """Key-sorted, compact JSON: independent of formatting/whitespace choices."""
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer`` with EOS/PAD ids and a fingerprint.

    ``encode`` never adds special tokens; document boundaries are the caller's
    business (see ``megamor.data.shards``). Note that the literal text of a
    special token inside an input string is encoded as that special token.
    """

    def __init__(self, hf: HFTokenizer, eos_token: str, pad_token: str | None = None) -> None:
        self._hf = hf
        self.eos_token = eos_token
        self.pad_token = pad_token
        eos_id = hf.token_to_id(eos_token)
        if eos_id is None:
            raise TokenizerError(f"eos token {eos_token!r} is not in the vocabulary")
        self.eos_id: int = eos_id
        pad_id = hf.token_to_id(pad_token) if pad_token is not None else None
        if pad_token is not None and pad_id is None:
            raise TokenizerError(f"pad token {pad_token!r} is not in the vocabulary")
        # Fall back to EOS for padding: labels at padded positions are masked anyway.
        self.pad_id: int = pad_id if pad_id is not None else eos_id
        self.fingerprint: str = hashlib.sha256(
            _canonical_json(hf.to_str()).encode("utf-8")
        ).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def hf(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.json`` and the meta file into ``out_dir``; return the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / TOKENIZER_FILE, self._hf.to_str(pretty=True))
        meta = {
            "format_version": 1,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
        }
        _atomic_write_text(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, fingerprint={self.fingerprint[:12]}...)"
        )


def _new_byte_level_bpe() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a byte-level BPE of (at most) ``vocab_size`` entries and save it to ``out_dir``.

    ``special_tokens[0]`` is the EOS token, ``special_tokens[1]`` (if given) the
    PAD token; special tokens get the lowest ids. The full 256-byte alphabet is
    always included, so ``vocab_size`` must exceed ``256 + len(special_tokens)``.
    """
    special_tokens = tuple(special_tokens)
    if not special_tokens:
        raise ValueError("special_tokens must contain at least the EOS token")
    minimum = 256 + len(special_tokens)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} must be > {minimum} (bytes + special tokens)")
    hf = _new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf, eos_token=special_tokens[0], pad_token=special_tokens[1] if len(special_tokens) > 1 else None)
    tok.save(out_dir)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory containing one.

    EOS/PAD tokens come from ``megamor_tokenizer.json`` beside it when present,
    else the defaults ``<|endoftext|>``/``<|pad|>`` (PAD only if in the vocab).
    """
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise TokenizerError(f"tokenizer file not found: {file}")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise TokenizerError(f"cannot read tokenizer file {file}: {e}") from e
    meta_file = file.with_name(META_FILE)
    eos, pad = DEFAULT_SPECIAL_TOKENS
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            eos, pad = meta["eos_token"], meta.get("pad_token")
        except (ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"cannot read tokenizer meta file {meta_file}: {e!r}") from e
    elif hf.token_to_id(pad) is None:
        pad = None
    try:
        return Tokenizer(hf, eos_token=eos, pad_token=pad)
    except TokenizerError as e:
        raise TokenizerError(f"{file}: {e}") from e
