"""Data path: readers, preparation, packed webdataset shards, blending and the batch sampler.

Names are imported lazily (PEP 562), so ``megamor --help`` and the CLI's argument
parsing do not pay for importing torch.
"""

from __future__ import annotations

from megamor.lazy_exports import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
