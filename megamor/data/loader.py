"""Training data: dataset specs, weighted blending, and the per-rank batch loader.

Everything is addressed by global sample index, so what a global batch holds
depends only on (data spec, seed, global batch size, step):

* ``GlobalBatchSampler`` (``sampler.py``) maps global batch k to sample indices
  (per-epoch permutations from ``(seed, epoch)``, endless, dp-invariant layout);
* ``BlendedDataset`` maps a blended index to (component, sample) through a fixed,
  seed-determined interleaving with exact proportions;
* ``BatchLoader`` reads this rank's micro-batches of step k, in this process or
  in DataLoader workers: the result is the same for any number of workers, and
  starting at step k reads only step k's samples (exact, cheap resume).

Spec syntax (``data.path``): ``megamor.data.spec``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from megamor.data.manifest import DataError
from megamor.data.sampler import GlobalBatchSampler
from megamor.data.shard_reader import ShardedTokenDataset
from megamor.data.spec import parse_data_spec


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    raw = weights / weights.sum() * total
    base = np.floor(raw).astype(np.int64)
    short = total - int(base.sum())
    if short:
        order = np.lexsort((np.arange(len(raw)), -(raw - base)))  # largest remainder, then index
        base[order[:short]] += 1
    return base


class BlendedDataset(torch.utils.data.Dataset):
    """Weighted mixture of datasets, deterministic by global index.

    ``num_samples`` (default: the sum of the components' sizes) blended samples;
    component ``d`` gets ``n_d`` of them (``weights`` normalised, largest remainder
    rounding) spread evenly: its k-th sample sits at the ``(k + 0.5) / n_d`` quantile
    of the blend (ties by component order). Component ``d``'s k-th sample is
    ``perm_{d, r}[k mod len_d]`` with ``r = k // len_d`` and ``perm_{d, r}`` a
    permutation from ``(seed, d, r)``: an up-weighted component is repeated in a
    fresh order each pass, a down-weighted one contributes a random subset. The
    ``GlobalBatchSampler`` then shuffles blended indices per epoch as usual.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], seed: int = 0,
                 num_samples: int | None = None, names: Sequence[str] | None = None) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError("need one weight per dataset and at least one dataset")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
        self.datasets = list(datasets)
        self.names = list(names) if names is not None else [str(i) for i in range(len(datasets))]
        sizes = [len(d) for d in self.datasets]
        for name, n in zip(self.names, sizes):
            if n < 1:
                raise DataError(f"blended dataset {name}: has no samples")
        self.weights = (w / w.sum()).tolist()
        self.seed = seed
        total = int(num_samples) if num_samples is not None else int(sum(sizes))
        if total < 1:
            raise ValueError(f"num_samples must be >= 1, got {total}")
        self.counts = _largest_remainder(w, total)
        times = np.concatenate([(np.arange(n) + 0.5) / n for n in self.counts if n > 0])
        ids = np.concatenate([np.full(n, d, dtype=np.int32) for d, n in enumerate(self.counts) if n > 0])
        order = np.lexsort((ids, times))
        self.dataset_index = ids[order]
        self.sample_index = np.empty(total, dtype=np.int64)
        for d, n in enumerate(self.counts):
            if n == 0:
                continue
            local = np.concatenate([
                np.random.default_rng([seed, d, r]).permutation(sizes[d])
                for r in range(-(-int(n) // sizes[d]))])[:n]
            self.sample_index[self.dataset_index == d] = local
        self.seq_length = getattr(self.datasets[0], "seq_length", None)
        self.has_doc_starts = all(getattr(d, "has_doc_starts", False) for d in self.datasets)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def source(self, i: int) -> tuple[int, int]:
        """(component, component sample index) of blended sample ``i``."""
        return int(self.dataset_index[i]), int(self.sample_index[i])

    def __getitem__(self, i: int) -> torch.Tensor:
        d, j = self.source(i)
        return self.datasets[d][j]

    def doc_starts(self, i: int) -> np.ndarray:
        d, j = self.source(i)
        return self.datasets[d].doc_starts(j)


def open_training_data(
    spec: str | Sequence[Any],
    seq_length: int,
    expect_fingerprint: str | Sequence[str] | None = None,
    *,
    split: str = "train",
    seed: int = 0,
    num_samples: int | None = None,
    on_corrupt: str = "error",
    verify_checksums: bool = True,
) -> ShardedTokenDataset | BlendedDataset:
    """The dataset for a data spec (see module doc): one ``ShardedTokenDataset`` for a single
    path (exactly what the trainer opened before), a ``BlendedDataset`` otherwise.

    Every component must match ``seq_length`` and the tokenizer fingerprint (the first
    component's when ``expect_fingerprint`` is None); a mismatch is a ``DataError`` naming
    the manifest file and both values.
    """
    comps = parse_data_spec(spec)
    parts: list[ShardedTokenDataset] = []
    for c in comps:
        fp = expect_fingerprint if expect_fingerprint is not None or not parts \
            else parts[0].manifest.tokenizer_fingerprint
        try:
            ds = ShardedTokenDataset(c.path, split, expect_seq_length=seq_length, expect_fingerprint=fp,
                                     verify_checksums=verify_checksums, on_corrupt=on_corrupt)
        except DataError as e:
            if len(comps) > 1 and expect_fingerprint is None and parts and "fingerprint" in str(e):
                raise DataError(f"{e} (the tokenizer of the first blended dataset "
                                f"{comps[0].path}; blended datasets must share one tokenizer)") from e
            raise
        if len(ds) == 0:
            raise DataError(f"{ds.manifest.path}: split {split!r} has no samples")
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    weights = [c.weight if c.weight is not None else float(len(p)) for c, p in zip(comps, parts)]
    return BlendedDataset(parts, weights, seed=seed, num_samples=num_samples,
                          names=[str(c.path) for c in comps])


# ----------------------------------------------------------------------------- loader


def collate_samples(samples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tokens = sample[:-1]``, ``labels = sample[1:]`` ([b, s] int64), like ``get_batch``."""
    x = torch.stack(list(samples))
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class _MicroBatchIndices:
    """Batch sampler for DataLoader: this rank's micro-batches from global batch ``start`` on."""

    def __init__(self, sampler: GlobalBatchSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[list[int]]:
        for k in itertools.count(self.start):
            yield from self.sampler.rank_micro_batches(k)


class BatchLoader:
    """Iterates this rank's micro-batches, one list (of ``num_micro_batches`` dicts) per step.

    Starts at global batch ``sampler.consumed_samples // global_batch_size`` and advances
    ``sampler.consumed_samples`` as each step's list is yielded (so ``sampler.state_dict()``
    taken after training on it resumes at the next step). ``num_workers > 0`` prefetches in
    DataLoader worker processes; the batches are identical for any worker count.
    """

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, num_workers: int = 0,
                 prefetch_factor: int = 2) -> None:
        if len(dataset) != sampler.num_samples:
            raise ValueError(f"sampler is for {sampler.num_samples} samples, dataset has {len(dataset)}")
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        s = self.sampler
        G, m = s.global_batch_size, s.num_micro_batches
        start = s.consumed_samples // G
        if self.num_workers == 0:
            for k in itertools.count(start):
                batch = [collate_samples([self.dataset[int(i)] for i in mb])
                         for mb in s.rank_micro_batches(k)]
                s.consumed_samples = (k + 1) * G
                yield batch
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_MicroBatchIndices(s, start), collate_fn=collate_samples,
            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
            multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods()
            else None)
        it = iter(loader)
        try:
            for k in itertools.count(start):
                batch = [next(it) for _ in range(m)]
                s.consumed_samples = (k + 1) * G
                yield batch
        finally:
            del it
