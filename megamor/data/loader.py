"""Training data: dataset specs, weighted blending, and the per-rank batch loader.

Everything is addressed by global sample index, so what a global batch holds
depends only on (data spec, seed, global batch size, step):

* ``GlobalBatchSampler`` (``sampler.py``) maps global batch k to sample indices
  (per-epoch permutations from ``(seed, epoch)``, endless, dp-invariant layout);
* ``BlendedDataset`` maps a blended index to (component, sample) through a fixed,
  seed-determined interleaving with exact proportions;
* ``BatchLoader`` gives this rank's micro-batches of step k, read ahead in a
  background thread (the training loop's input): the result is the same whatever
  the timing or the number of DataLoader workers, and starting at step k reads
  from step k's samples on (exact, cheap resume).

Spec syntax (``data.path``): ``megamor.data.spec``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
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


class _Failed:
    """A read error, carried from the reading thread to the caller of ``BatchLoader.get``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_POLL_S = 0.1  # how often a waiting thread looks at its stop flag (and a waiting caller at the thread)


def _read_step(dataset: Any, order: GlobalBatchSampler, k: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of global batch ``k``, read in this thread."""
    return [collate_samples([dataset[int(i)] for i in mb]) for mb in order.rank_micro_batches(k)]


def _steps(dataset: Any, order: GlobalBatchSampler, start: int, num_workers: int,
           prefetch_factor: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Steps ``start, start + 1, ...``: read here, or by DataLoader worker processes."""
    if num_workers == 0:
        for k in itertools.count(start):
            yield _read_step(dataset, order, k)
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_MicroBatchIndices(order, start), collate_fn=collate_samples,
        num_workers=num_workers, prefetch_factor=prefetch_factor,
        multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods()
        else None)
    it = iter(loader)
    try:
        while True:
            yield [next(it) for _ in range(order.num_micro_batches)]
    finally:
        del it  # the worker processes end here


class _Reader:
    """One daemon thread reading the steps of ``steps`` (from ``start`` on, in order) into a
    queue, at most ``ahead`` steps ahead of the consumer: a step is read only once a slot is
    free, and ``take`` frees one. It stops at ``stop`` (looked at between steps and while
    waiting for a slot) and after its first error, which it queues for ``take`` to raise.
    It holds no reference to the ``BatchLoader`` (which can then be garbage-collected)."""

    def __init__(self, steps: Iterator, start: int, ahead: int) -> None:
        self.next_step = start  # the step ``take`` returns next
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.slots = threading.Semaphore(ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(steps, start),
                                       name=f"megamor-prefetch-from-{start}", daemon=True)
        self.thread.start()

    def _run(self, steps: Iterator, start: int) -> None:
        try:
            for k in itertools.count(start):
                while not self.slots.acquire(timeout=_POLL_S):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                t0 = time.perf_counter()
                batch = next(steps)
                self.queue.put((k, batch, time.perf_counter() - t0))
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self.queue.put((None, _Failed(e), 0.0))
        finally:
            steps.close()

    def take(self) -> tuple[list[dict[str, torch.Tensor]], float]:
        """The next step's batches and the seconds reading them took; raises the reader's error."""
        while True:
            try:
                k, batch, read_s = self.queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                # The thread queues a batch or an error before it ends: ending without either
                # (stopped by `close`) is reported, never waited on forever.
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError(f"the data prefetch thread ended before step "
                                       f"{self.next_step} was read") from None
        if isinstance(batch, _Failed):
            raise batch.error
        assert k == self.next_step, (k, self.next_step)
        self.next_step += 1
        self.slots.release()
        return batch, read_s


class BatchLoader:
    """This rank's micro-batches of each step, read ahead in a background thread.

    ``get(k)`` returns the micro-batches (``num_micro_batches`` dicts of ``tokens`` and
    ``labels``) of global batch ``k``, this rank's share (``sampler.rank_micro_batches(k)``),
    and records in ``wait_s`` how long the caller waited for them (``read_s``: how long reading
    them took). While the caller trains on step ``k``, a thread reads steps ``k + 1`` ..
    ``k + prefetch_steps``: in this process (reads of memory-mapped shards release the GIL) or,
    with ``num_workers > 0``, through DataLoader worker processes. ``prefetch_steps=0`` (no
    workers) reads on the caller's thread.

    Deterministic: the batches depend only on the dataset, the sampler's seed and layout and
    ``k``, never on timing or worker count. The thread reads steps in order; asking for another
    step than the next one (a resume, a jump) restarts it at that step (a resume at step k reads
    nothing before step k).

    Errors: a read error (a ``DataError`` naming the shard) is raised by the ``get`` of the step
    that needed it, on the caller's thread, as the same exception object. ``close()`` stops the
    thread (also done on garbage collection and when an iteration ends), waiting at most 2 s for
    a read in progress; the thread is a daemon that waits only with timeouts, so neither a
    signal handler nor interpreter exit waits on it.

    Iterating (``for batches in loader``) starts at global batch
    ``sampler.consumed_samples // global_batch_size`` and advances ``sampler.consumed_samples``
    as each step's list is yielded (so ``sampler.state_dict()`` taken after training on it
    resumes at the next step).
    """

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, num_workers: int = 0,
                 prefetch_factor: int = 2, prefetch_steps: int = 2) -> None:
        if len(dataset) != sampler.num_samples:
            raise ValueError(f"sampler is for {sampler.num_samples} samples, dataset has {len(dataset)}")
        if prefetch_steps < 0 or num_workers < 0:
            raise ValueError(f"prefetch_steps ({prefetch_steps}) and num_workers ({num_workers}) "
                             "must be >= 0")
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.prefetch_steps = max(prefetch_steps, 1) if num_workers else prefetch_steps
        self._reader: _Reader | None = None
        self._finalizer: weakref.finalize | None = None
        self.wait_s = 0.0  # seconds the last `get` waited for its batches
        self.read_s = 0.0  # seconds reading the last step took

    def _order(self) -> GlobalBatchSampler:
        """A private copy of the sampler's order (its epoch cache is not shared between threads;
        the order is a function of seed, epoch and layout either way)."""
        s = self.sampler
        return GlobalBatchSampler(s.num_samples, s.global_batch_size, s.micro_batch_size,
                                  s.dp_size, s.dp_rank, s.seed)

    def get(self, k: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global batch ``k`` (see the class doc); sets ``wait_s``."""
        t0 = time.perf_counter()
        if self.prefetch_steps == 0:
            batch = _read_step(self.dataset, self.sampler, k)
            self.read_s = time.perf_counter() - t0
        else:
            if self._reader is None or self._reader.next_step != k:
                self.close()
                steps = _steps(self.dataset, self._order(), k, self.num_workers,
                               self.prefetch_factor)
                self._reader = _Reader(steps, k, self.prefetch_steps)
                self._finalizer = weakref.finalize(self, self._reader.stop.set)
            try:
                batch, self.read_s = self._reader.take()
            except BaseException:
                self.close(timeout=1.0)  # the thread ended with its error; asking again restarts
                raise
        self.wait_s = time.perf_counter() - t0
        return batch

    def close(self, timeout: float = 2.0) -> None:
        """Stop the reading thread (waiting up to ``timeout`` s for a read in progress)."""
        reader, self._reader = self._reader, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if reader is not None:
            reader.stop.set()
            if reader.thread is not threading.current_thread():
                reader.thread.join(timeout)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        s = self.sampler
        G = s.global_batch_size
        k = s.consumed_samples // G
        try:
            while True:
                batch = self.get(k)
                k += 1
                s.consumed_samples = k * G
                yield batch
        finally:
            self.close()
