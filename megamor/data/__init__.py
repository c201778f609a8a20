"""Data path: readers, preparation, packed webdataset shards, blending and the batch sampler.

Names are imported lazily (PEP 562), so ``megamor --help`` and the CLI's argument
parsing do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "builtin_dataset_root": "builtin",
    "ensure_builtin_dataset": "builtin",
    "builtin_corpus": "corpus",
    "GlobalBatchSampler": "sampler",
    "get_batch": "sampler",
    "DataError": "manifest",
    "Manifest": "manifest",
    "ShardInfo": "manifest",
    "SplitInfo": "manifest",
    "load_manifest": "manifest",
    "PackedSplitWriter": "shard_writer",
    "ShardedTokenDataset": "shard_reader",
    "Counts": "sources",
    "iter_documents": "sources",
    "resolve_inputs": "sources",
    "PrepareResult": "prepare",
    "prepare_dataset": "prepare",
    "BatchLoader": "loader",
    "BlendedDataset": "loader",
    "DataComponent": "spec",
    "collate_samples": "loader",
    "open_training_data": "loader",
    "parse_data_spec": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
