"""Tokenizer training and loading for megamor (byte-level BPE via HF ``tokenizers``)."""

from tokenizer.bpe import (
    DEFAULT_SPECIAL_TOKENS,
    META_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "META_FILE",
    "TOKENIZER_FILE",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "train_bpe",
]
