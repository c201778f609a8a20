"""Reading packed-token shards: random access by global sample index.

A shard is indexed and read by webdataset's indexed reader (wids' ``MMIndexedTar``: the tar's
member offsets from its headers, members read from a memory map). Around it megamor
keeps what the training run needs: the manifest (``megamor.data.manifest``) checked up front,
each shard's size and sha256 checked before its first use, errors that name the file, and the
``on_corrupt`` policy. The figure that chose wids over a hand-written tar index is in
docs/data.md ("Data throughput").
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from wids.wids_mmtar import MMIndexedTar

from megamor.data.manifest import (DOCSTARTS_EXT, SAMPLE_EXT, DataError, accepted_fingerprints,
                                   load_manifest, sha256_file)

CORRUPT_POLICIES = ("error", "skip")
log = logging.getLogger("megamor.data")


class ShardedTokenDataset(torch.utils.data.Dataset):
    """Random access to packed samples: ``ds[i]`` is a LongTensor of ``seq_length + 1``.

    Only the manifest is read up front. On first access to a shard, its size
    and sha256 are checked (streamed, not kept in memory) and wids indexes its tar
    members; samples are then read from wids' memory map. Picklable for DataLoader
    workers (shards are reopened per process).

    ``on_corrupt="error"`` (default): a missing, truncated or corrupt shard raises
    ``DataError`` naming the file. ``on_corrupt="skip"`` (opt-in): such a shard is
    logged loudly (``WARNING`` on the ``megamor.data`` logger) and its samples are
    replaced by the samples at the same offsets of the next good shard, so batch
    shapes and the order of every other sample are unchanged; ``skipped_shards``
    and ``substituted_samples`` count what happened.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        expect_seq_length: int | None = None,
        expect_fingerprint: str | Sequence[str] | None = None,
        *,
        verify_checksums: bool = True,
        on_corrupt: str = "error",
    ) -> None:
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt={on_corrupt!r}: must be one of {CORRUPT_POLICIES}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.verify_checksums = verify_checksums
        self.on_corrupt = on_corrupt
        self.manifest = load_manifest(self.data_dir)
        mpath = self.manifest.path
        if expect_seq_length is not None and self.manifest.seq_length != expect_seq_length:
            raise DataError(f"{mpath}: seq_length mismatch: manifest has "
                            f"{self.manifest.seq_length}, expected {expect_seq_length}")
        if expect_fingerprint is not None and \
                self.manifest.tokenizer_fingerprint not in accepted_fingerprints(expect_fingerprint):
            raise DataError(f"{mpath}: tokenizer fingerprint mismatch: manifest has "
                            f"{self.manifest.tokenizer_fingerprint}, expected "
                            f"{accepted_fingerprints(expect_fingerprint)[0]}")
        if split not in self.manifest.splits:
            raise DataError(f"{mpath}: no split {split!r} (have {sorted(self.manifest.splits)})")
        self.info = self.manifest.splits[split]
        self.seq_length = self.manifest.seq_length
        self.has_doc_starts = self.info.doc_starts
        # shard -> its open wids reader and, per member kind, each sample's member offset in it
        self._shards: dict[int, tuple[MMIndexedTar, dict[str, list[int]]]] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.skipped_shards: dict[str, str] = {}  # shard file -> reason (on_corrupt="skip")
        self.substituted_samples = 0

    def __len__(self) -> int:
        return self.info.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close open shards (only those opened by this process)."""
        if getattr(self, "_pid", None) == os.getpid():
            for tar, _ in getattr(self, "_shards", {}).values():
                try:
                    tar.close()
                except (OSError, ValueError):
                    pass
        self._shards = {}

    def _shard_path(self, j: int) -> Path:
        return self.data_dir / self.info.shards[j].file

    def _open_shard(self, j: int) -> tuple[MMIndexedTar, dict[str, list[int]]]:
        """Check shard ``j`` against the manifest and index it."""
        sh, path = self.info.shards[j], self._shard_path(j)
        if not path.is_file():
            raise DataError(f"shard missing: {path} (listed in {self.manifest.path})")
        size = path.stat().st_size
        if size != sh.num_bytes:
            raise DataError(f"shard {path}: size {size} bytes, manifest says {sh.num_bytes} "
                            f"(truncated or rewritten?)")
        if self.verify_checksums and (digest := sha256_file(path)) != sh.sha256:
            raise DataError(f"shard {path}: sha256 {digest} does not match manifest {sh.sha256} (corrupt)")
        try:
            tar = MMIndexedTar(str(path))
        except FileNotFoundError:
            raise DataError(f"shard missing: {path}") from None
        except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
            raise DataError(f"shard {path}: unreadable tar ({e})") from e
        first = j * self.info.samples_per_shard
        offsets: dict[str, list[int]] = {}
        for what in (SAMPLE_EXT, DOCSTARTS_EXT) if self.has_doc_starts else (SAMPLE_EXT,):
            found = [tar.by_name.get("%09d.%s" % (first + k, what)) for k in range(sh.num_samples)]
            if None in found:
                tar.close()
                raise DataError(f"shard {path}: {found.count(None)} of {sh.num_samples} samples' "
                                f"{what} missing from tar")
            offsets[what] = found
        return tar, offsets

    def verify_shard(self, j: int) -> None:
        """Check shard ``j`` as its first use does (size, sha256, every sample's members);
        ``DataError`` naming the file when it fails (`megamor data inspect --verify`)."""
        tar, _ = self._open_shard(j)
        tar.close()

    def _shard(self, j: int) -> tuple[MMIndexedTar, dict[str, list[int]]]:
        with self._lock:
            if self._pid != os.getpid():  # forked: don't share open files with the parent
                self._shards, self._pid = {}, os.getpid()
            if j not in self._shards:
                self._shards[j] = self._open_shard(j)
            return self._shards[j]

    def _read_npy(self, j: int, k: int, i: int, what: str) -> np.ndarray:
        tar, offsets = self._shard(j)
        try:
            _, raw = tar.get_at_offset(offsets[what][k])
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, EOFError, OSError, struct.error) as e:
            raise DataError(f"shard {self._shard_path(j)}: cannot decode {what} of sample {i}: {e}") from e

    def _read_tokens(self, j: int, k: int, i: int) -> np.ndarray:
        arr = self._read_npy(j, k, i, SAMPLE_EXT)
        if arr.shape != (self.seq_length + 1,):
            raise DataError(f"shard {self._shard_path(j)}: sample {i} has shape {arr.shape}, "
                            f"expected ({self.seq_length + 1},)")
        return arr

    def _mark_bad(self, j: int, err: DataError) -> None:
        path = str(self._shard_path(j))
        if path not in self.skipped_shards:
            self.skipped_shards[path] = str(err)
            log.warning("SKIPPING corrupt shard %s (on_corrupt=skip): %s -- %d of %d shards of split "
                        "%r skipped so far; its samples are replaced by those of the next good shard",
                        path, err, len(self.skipped_shards), len(self.info.shards), self.split)

    def _locate(self, i: int) -> tuple[int, int, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for split {self.split!r} of size {n}")
        j, k = divmod(i, self.info.samples_per_shard)
        return i, j, k

    def _get(self, i: int) -> tuple[np.ndarray, int, int]:
        """(tokens, shard, offset) of sample ``i``, substituting per the on_corrupt policy."""
        i, j, k = self._locate(i)
        if self.on_corrupt == "error":
            return self._read_tokens(j, k, i), j, k
        nshards = len(self.info.shards)
        for _ in range(nshards):
            if str(self._shard_path(j)) not in self.skipped_shards:
                try:
                    arr = self._read_tokens(j, k, i)
                    if self.has_doc_starts:
                        self._read_npy(j, k, i, DOCSTARTS_EXT)
                    if (j, k) != self._locate(i)[1:]:
                        self.substituted_samples += 1
                    return arr, j, k
                except DataError as e:
                    self._mark_bad(j, e)
            j = (j + 1) % nshards
            k %= self.info.shards[j].num_samples
        raise DataError(f"{self.data_dir}: all {nshards} shards of split {self.split!r} are "
                        f"unreadable (on_corrupt=skip): {self.skipped_shards}")

    def __getitem__(self, i: int) -> torch.Tensor:
        arr, _, _ = self._get(i)
        return torch.from_numpy(arr.astype(np.int64))

    def doc_starts(self, i: int) -> np.ndarray:
        """Positions in sample ``i`` (0..seq_length) where a document begins (int32).

        Only for splits prepared with ``--keep-boundaries`` (``DataError`` otherwise).
        """
        if not self.has_doc_starts:
            raise DataError(f"{self.manifest.path}: split {self.split!r} was prepared without "
                            "document boundaries (use `megamor data prepare --keep-boundaries`)")
        _, j, k = self._get(i)
        return self._read_npy(j, k, i, DOCSTARTS_EXT).astype(np.int32)
