"""Deterministic, resumable global-batch sampler with a dp-invariant layout.

The sample order is an endless concatenation of epochs, epoch ``e`` being a
permutation of ``range(num_samples)`` drawn from ``numpy.random.default_rng([seed, e])``.
Global batch ``k`` is positions ``[k*G, (k+1)*G)`` of that order, so a batch
may straddle an epoch boundary (no samples are dropped or repeated within the
stream).

Within a global batch, micro-batch ``m`` of data-parallel rank ``d`` holds
positions ``m*(mbs*dp) + d*mbs + [0, mbs)``. Hence the union over ranks of
micro-step ``m`` is the contiguous slice ``[m*mbs*dp, (m+1)*mbs*dp)`` whatever
``dp`` is: one process with ``micro_batch_size = mbs*dp`` sees exactly what
``dp`` ranks see together at every micro-step (bitwise-comparable runs).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch


class GlobalBatchSampler:
    """Yields, per global batch, this rank's micro-batches (lists of sample indices).

    ``consumed_samples`` counts samples of the whole global stream (all ranks);
    it advances by ``global_batch_size`` each time a global batch is yielded,
    so ``state_dict()`` taken after training on a yielded batch resumes at the
    next one.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        dp_rank: int,
        seed: int,
        consumed_samples: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if micro_batch_size < 1 or dp_size < 1 or global_batch_size < 1:
            raise ValueError("global_batch_size, micro_batch_size and dp_size must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} out of range for dp_size={dp_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} not divisible by "
                f"micro_batch_size*dp_size={micro_batch_size}*{dp_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self.consumed_samples = 0
        self._set_consumed(consumed_samples)

    def _set_consumed(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.global_batch_size:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"global_batch_size={self.global_batch_size}")
        self.consumed_samples = consumed_samples

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch`` (cached: a batch touches at most a few epochs)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def positions_to_indices(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at stream positions ``[start, stop)``."""
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(stop - pos, self.num_samples - offset)
            out[pos - start:pos - start + take] = self.epoch_permutation(epoch)[offset:offset + take]
            pos += take
        return out

    def global_batch(self, k: int) -> np.ndarray:
        """All ``global_batch_size`` sample indices of global batch ``k`` (all ranks)."""
        G = self.global_batch_size
        return self.positions_to_indices(k * G, (k + 1) * G)

    def rank_micro_batches(self, k: int) -> list[list[int]]:
        """This rank's micro-batches of global batch ``k``."""
        gb = self.global_batch(k).reshape(self.num_micro_batches, self.dp_size, self.micro_batch_size)
        return gb[:, self.dp_rank, :].tolist()

    def epoch_of_batch(self, k: int) -> int:
        """Epoch of the first sample of global batch ``k``."""
        return (k * self.global_batch_size) // self.num_samples

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            k = self.consumed_samples // self.global_batch_size
            batch = self.rank_micro_batches(k)
            self.consumed_samples += self.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the seed and dataset size must match (else the order would silently change)."""
        for key in ("seed", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state {key}={state[key]} != current {getattr(self, key)}")
        self._set_consumed(int(state["consumed_samples"]))


def get_batch(dataset: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Stack samples into ``tokens = sample[:-1]`` and ``labels = sample[1:]`` ([b, s] int64)."""
    samples = torch.stack([dataset[int(i)] for i in indices])
    return {"tokens": samples[:, :-1].contiguous(), "labels": samples[:, 1:].contiguous()}
