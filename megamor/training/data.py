"""The training data of a run: tokenizer, samples, this rank's share of each global batch
(`GlobalBatchSampler`), and the data position a checkpoint keeps (`TrainingData`)."""

from __future__ import annotations

import os
from pathlib import Path

from megamor.data import BatchLoader, GlobalBatchSampler


def open_dataset(cfg):
    """The tokenizer and the training samples: one prepared dataset, a weighted blend
    (`data.path="0.7:/a,0.3:/b"`), or the embedded corpus (built on first use)."""
    from megamor.data import (builtin_dataset_root, ensure_builtin_dataset, open_training_data,
                              parse_data_spec)
    from megamor.tokenizer import load_tokenizer

    if cfg.data.path == "builtin":
        base = Path(os.path.expanduser(cfg.data.builtin_root))
        root = builtin_dataset_root(base, cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
        ensure_builtin_dataset(root, cfg.model.seq_length, cfg.data.tokenizer_vocab_size)
        spec = str(root)
    else:
        spec = cfg.data.path
    tok = load_tokenizer(cfg.data.tokenizer or Path(parse_data_spec(spec)[0].path) / "tokenizer")
    train = open_training_data(spec, cfg.model.seq_length, tok.fingerprints, seed=cfg.data.seed,
                               on_corrupt=cfg.data.on_corrupt)
    return tok, train


class TrainingData:
    """Global batch k is the same samples whatever the layout; data-parallel rank d takes its
    micro-batches of it (megamor/data/sampler.py). The position (samples consumed) is what a
    checkpoint keeps of the data."""

    def __init__(self, cfg, dims):
        self.cfg = cfg
        self.tokenizer, self.dataset = open_dataset(cfg)
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dims.dp)
        self.sampler = GlobalBatchSampler(len(self.dataset), t.global_batch_size,
                                          t.micro_batch_size, dims.dp, dims.dp_rank, cfg.data.seed)
        # This rank's micro-batches of step k, read ahead in a background thread
        # (`data.prefetch_steps`; megamor/data/loader.py).
        self.batches = BatchLoader(self.dataset, self.sampler, prefetch_steps=cfg.data.prefetch_steps)
        self.consumed_samples = 0

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of global batch `step` (0-based), each {"tokens", "labels"}
        [b, s]: where the loop takes its data, once per step. Read ahead; a read error is
        raised here, on the training thread."""
        return self.batches.get(step)

    @property
    def wait_s(self) -> float:
        """Seconds the last `micro_batches` call waited for its data (this rank's)."""
        return self.batches.wait_s

    def close(self) -> None:
        """Stop the read-ahead thread."""
        self.batches.close()

    def advance(self) -> None:
        self.consumed_samples += self.cfg.train.global_batch_size

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, meta: dict, checkpoint: Path) -> None:
        self.consumed_samples = meta["consumed_samples"]

    def describe(self) -> str:
        """The data as the start-up banner names it."""
        d = self.cfg.data
        if d.path != "builtin":
            return d.path
        from megamor.data import builtin_dataset_root
        root = builtin_dataset_root(Path(os.path.expanduser(d.builtin_root)),
                                    self.cfg.model.seq_length, d.tokenizer_vocab_size)
        return f"builtin (CPython's documentation) at {root}"
