"""Tokenizer training and loading for megamor (byte-level BPE via HF ``tokenizers``)."""

from megamor.tokenizer.bpe import (
    CHECKPOINT_TOKENIZER_DIR,
    DEFAULT_SPECIAL_TOKENS,
    EOS_CANDIDATES,
    META_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
    load_from_checkpoint,
    load_tokenizer,
    save_with_checkpoint,
    train_bpe,
)

__all__ = [
    "CHECKPOINT_TOKENIZER_DIR",
    "DEFAULT_SPECIAL_TOKENS",
    "EOS_CANDIDATES",
    "META_FILE",
    "TOKENIZER_FILE",
    "Tokenizer",
    "TokenizerError",
    "load_from_checkpoint",
    "load_tokenizer",
    "save_with_checkpoint",
    "train_bpe",
]
