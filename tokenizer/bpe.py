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

from megamor.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "megamor_tokenizer.json"
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


class TokenizerError(InputError, ValueError):
    """A tokenizer file is missing, unreadable or inconsistent."""

    kind = "data"


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


# The parts of tokenizer.json that decide token ids. Left out: the post-processor (special
# tokens added around a sequence on request: megamor never asks, and transformers' export adds
# a no-op TemplateProcessing), the decoder (ids -> text), truncation and padding.
TOKEN_ID_FIELDS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


def token_id_fingerprint(hf: HFTokenizer) -> str:
    """sha256 of the key-sorted JSON of `TOKEN_ID_FIELDS`: equal for tokenizers that map every
    text to the same ids."""
    data = json.loads(hf.to_str())
    ids = {k: data.get(k) for k in TOKEN_ID_FIELDS}
    return hashlib.sha256(json.dumps(ids, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer`` with EOS/PAD ids and a fingerprint.

    ``encode`` never adds special tokens; document boundaries are the caller's
    business (see ``megamor.data.shard_writer``). Note that the literal text of a
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
        self.fingerprint: str = token_id_fingerprint(hf)
        # The form written before it covered only what changes token ids (the whole
        # tokenizer.json): still accepted when reading manifests and checkpoints.
        self.legacy_fingerprint: str = hashlib.sha256(
            _canonical_json(hf.to_str()).encode("utf-8")
        ).hexdigest()

    @property
    def fingerprints(self) -> tuple[str, str]:
        """Every fingerprint this tokenizer answers to: the current form, then the legacy one."""
        return self.fingerprint, self.legacy_fingerprint

    def matches(self, fingerprint: str | None) -> bool:
        """Whether data or a checkpoint recorded with `fingerprint` was tokenized by this
        tokenizer (either form)."""
        return fingerprint in self.fingerprints

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
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE of (at most) ``vocab_size`` entries and save it to ``out_dir``.

    ``special_tokens[0]`` is the EOS token, ``special_tokens[1]`` (if given) the
    PAD token; special tokens get the lowest ids. The full 256-byte alphabet is
    always included, so ``vocab_size`` must exceed ``256 + len(special_tokens)``.
    ``length`` (the number of texts, if known) only feeds the progress bar.
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
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=length)
    tok = Tokenizer(hf, eos_token=special_tokens[0], pad_token=special_tokens[1] if len(special_tokens) > 1 else None)
    tok.save(out_dir)
    return tok


# Hugging Face tokenizer directories name their special tokens in these files (first found wins).
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Tried in order when nothing names the EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


def _token_content(value: object) -> str | None:
    """A special-token entry of a HF config: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _hf_special_tokens(directory: Path) -> tuple[str | None, str | None, Path | None]:
    """(eos, pad, file they came from) from a HF tokenizer directory's config files."""
    for name in HF_CONFIG_FILES:
        f = directory / name
        if f.is_file():
            cfg = _read_json(f)
            eos, pad = _token_content(cfg.get("eos_token")), _token_content(cfg.get("pad_token"))
            if eos is not None or pad is not None:
                return eos, pad, f
    return None, None, None


def _from_vocab_merges(directory: Path) -> HFTokenizer:
    """A GPT-2 style directory (vocab.json + merges.txt, no tokenizer.json) as a byte-level BPE."""
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises a bare Exception
        raise TokenizerError(f"cannot read {vocab} / {merges}: {e}") from e
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    cfg_file = directory / "tokenizer_config.json"
    added = _read_json(cfg_file).get("added_tokens_decoder", {}) if cfg_file.is_file() else {}
    for tid, entry in sorted(added.items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry)
        if content is None or hf.token_to_id(content) is not None:
            continue
        hf.add_special_tokens([content])
        if hf.token_to_id(content) != int(tid):
            raise TokenizerError(f"{cfg_file}: added token {content!r} should have id {tid}, "
                                 f"got {hf.token_to_id(content)}")
    return hf


def load_tokenizer(path: str | Path, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
    """Load a tokenizer offline from a ``tokenizer.json`` file or a directory.

    Accepted: a megamor tokenizer directory (``tokenizer.json`` + ``megamor_tokenizer.json``),
    any Hugging Face tokenizer directory with a ``tokenizer.json`` (e.g. SmolLM's, 49,152
    entries) or with ``vocab.json`` + ``merges.txt`` (GPT-2 style byte-level BPE), or a bare
    ``tokenizer.json``. EOS/PAD come from, in order: the arguments, ``megamor_tokenizer.json``,
    the directory's ``tokenizer_config.json`` / ``special_tokens_map.json``, else the first of
    ``EOS_CANDIDATES`` in the vocabulary (and ``<|pad|>`` for PAD when present, else EOS).
    """
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if file.is_file():
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"cannot read tokenizer file {file}: {e}") from e
    elif p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        hf = _from_vocab_merges(p)
        file = p / "vocab.json"
    elif p.is_dir() and (p / "tokenizer.model").is_file():
        raise TokenizerError(f"{p}: only a sentencepiece tokenizer.model, no tokenizer.json; "
                             "convert it to tokenizer.json (e.g. with transformers) first")
    else:
        raise TokenizerError(f"tokenizer file not found: {file}")
    meta_file = directory / META_FILE
    eos, pad, source = eos_token, pad_token, "argument"
    if eos is None:
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                eos, source = meta["eos_token"], str(meta_file)
                pad = pad if pad is not None else meta.get("pad_token")
            except (ValueError, KeyError, TypeError) as e:
                raise TokenizerError(f"cannot read tokenizer meta file {meta_file}: {e!r}") from e
        else:
            hf_eos, hf_pad, cfg_file = _hf_special_tokens(directory)
            if hf_eos is not None:
                eos, source = hf_eos, str(cfg_file)
            if pad is None:
                pad = hf_pad
            if eos is None:
                eos = next((c for c in EOS_CANDIDATES if hf.token_to_id(c) is not None), None)
                source = "default candidates"
            if eos is None:
                raise TokenizerError(f"{file}: cannot tell the EOS token (no {META_FILE}, no eos_token "
                                     f"in {' / '.join(HF_CONFIG_FILES)}, none of {list(EOS_CANDIDATES)} "
                                     "in the vocabulary); pass it explicitly")
            if pad is None and hf.token_to_id(DEFAULT_SPECIAL_TOKENS[1]) is not None:
                pad = DEFAULT_SPECIAL_TOKENS[1]
    try:
        return Tokenizer(hf, eos_token=eos, pad_token=pad)
    except TokenizerError as e:
        raise TokenizerError(f"{file}: {e} (eos/pad from {source})") from e


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_TOKENIZER_DIR = "tokenizer"


def save_with_checkpoint(tok: Tokenizer, checkpoint_dir: str | Path) -> Path:
    """Store the run's tokenizer inside a checkpoint directory (``<ckpt>/tokenizer/``).

    A no-op when an identical tokenizer is already there; a different one is an error
    (a checkpoint directory belongs to one run).
    """
    dest = Path(checkpoint_dir) / CHECKPOINT_TOKENIZER_DIR
    if (dest / TOKENIZER_FILE).is_file():
        load_from_checkpoint(checkpoint_dir, expect_fingerprint=tok.fingerprint)
        return dest
    return tok.save(dest)


def load_from_checkpoint(checkpoint_dir: str | Path, expect_fingerprint: str | None = None) -> Tokenizer:
    """The tokenizer stored with a checkpoint; ``TokenizerError`` if it is not the expected one."""
    dest = Path(checkpoint_dir) / CHECKPOINT_TOKENIZER_DIR
    tok = load_tokenizer(dest)
    if expect_fingerprint is not None and not tok.matches(expect_fingerprint):
        raise TokenizerError(f"{dest / TOKENIZER_FILE}: tokenizer fingerprint {tok.fingerprint} "
                             f"!= expected {expect_fingerprint} (checkpoint from another tokenizer)")
    return tok
