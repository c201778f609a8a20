"""Data path: built-in corpus, packed webdataset shards, and the global batch sampler."""

from megamor.data.builtin import builtin_dataset_root, ensure_builtin_dataset
from megamor.data.corpus import builtin_corpus
from megamor.data.sampler import GlobalBatchSampler, get_batch
from megamor.data.shards import (
    DataError,
    Manifest,
    ShardedTokenDataset,
    ShardInfo,
    SplitInfo,
    load_manifest,
    prepare_shards,
)

__all__ = [
    "DataError",
    "GlobalBatchSampler",
    "Manifest",
    "ShardInfo",
    "ShardedTokenDataset",
    "SplitInfo",
    "builtin_corpus",
    "builtin_dataset_root",
    "ensure_builtin_dataset",
    "get_batch",
    "load_manifest",
    "prepare_shards",
]
