"""Built-in, download-free text corpus: CPython's pydoc topic help texts.

About 79 documents / 465k characters (exact content depends on the Python
version, which is why shard manifests record a hash of their source docs).
"""

from __future__ import annotations

# Every VAL_EVERY-th topic (sorted by name), starting at VAL_OFFSET, is held out: ~6 topics.
VAL_EVERY = 13
VAL_OFFSET = 6


def builtin_corpus() -> tuple[list[str], list[str]]:
    """Return ``(train_docs, val_docs)``: a deterministic split of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    train: list[str] = []
    val: list[str] = []
    for i, key in enumerate(sorted(topics)):
        (val if i % VAL_EVERY == VAL_OFFSET else train).append(topics[key])
    return train, val
