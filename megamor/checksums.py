"""Checksums of a checkpoint's files: computed by the ranks that save it, listed in its
`megamor.json`, verified by the ranks that load it.

    "checksum": "xxh3_128",
    "files": {"__0_0.distcp": [2120423, "5f0c..."], "common.pt": [1895, "..."], ...}

Every file of the checkpoint directory except `megamor.json` itself (which is written last and
marks the checkpoint complete) is listed with its size and its xxh3-128 hash: shards, the index,
DeepSpeed's engine state, `config.yaml`, the tokenizer. xxh3 is a non-cryptographic hash made for
this: it detects flipped or rewritten bytes, not deliberate tampering, at tens of GB/s per core
(`benchmarks/checkpoint_checksum.py` measures the cost per GB against reading the files).

Saving: right after the files are written, the ranks split them (`share`: the sorted list, every
`world`-th file) and each hashes its part; rank 0 gathers the entries and writes them into
`megamor.json`. Loading: the ranks split the listed files the same way, each checks size and
hash of its part, and the first problem any rank found is agreed by all (one collective) and
raised on every rank as the same `CheckpointError`. Single-process readers (export, eval,
depth maps, `megamor checkpoint verify`) check every file themselves.

A checkpoint saved before checksums were recorded has no "files": only the sizes of its shard
files are checked (against the torch_dist index, `megamor.checkpoint.verify_files`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ALGORITHM = "xxh3_128"
META = "megamor.json"
_CHUNK = 16 * 2**20


def hash_file(path: Path) -> tuple[int, str]:
    """(size in bytes, xxh3-128 hex digest) of one file, read in 16 MiB chunks."""
    import xxhash

    h = xxhash.xxh3_128()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def checkpoint_files(directory: Path) -> list[str]:
    """Every regular file under `directory` (relative POSIX paths, sorted) except megamor.json
    and the temporary files of atomic writes."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel == META or ".tmp." in name:
                continue
            out.append(rel)
    return sorted(out)


def share(names: list[str], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` hashes (on save) and verifies (on load)."""
    return names[rank::world]


def compute(directory: Path, names: list[str]) -> dict[str, list]:
    """{name: [size, hash]} of the given files of `directory`."""
    out = {}
    for name in names:
        size, digest = hash_file(directory / name)
        out[name] = [size, digest]
    return out


def check_entries(directory: Path, entries: dict[str, list]) -> Optional[str]:
    """The first problem among `entries` (missing file, other size, other hash) as one line
    naming the file, or None when every file is intact."""
    for name in sorted(entries):
        size, digest = entries[name]
        f = directory / name
        if not f.is_file():
            return f"{f}: file missing (listed in {directory / META})"
        actual = f.stat().st_size
        if actual != size:
            return f"{f}: size {actual} bytes, {directory / META} lists {size} (truncated or rewritten)"
        if hash_file(f)[1] != digest:
            return (f"{f}: {ALGORITHM} checksum differs from the one in {directory / META} "
                    f"(corrupt)")
    return None


def check_sizes(directory: Path, entries: dict[str, list]) -> Optional[str]:
    """Like `check_entries`, sizes only (no file is read): the pre-start check."""
    for name in sorted(entries):
        f = directory / name
        if not f.is_file():
            return f"{f}: file missing (listed in {directory / META})"
        if f.stat().st_size != entries[name][0]:
            return (f"{f}: size {f.stat().st_size} bytes, {directory / META} lists "
                    f"{entries[name][0]} (truncated or rewritten)")
    return None


# ----------------------------------------------------------------------------- across ranks


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def gather_entries(directory: Path) -> dict[str, list]:
    """Every rank hashes its share of the checkpoint's files; returns all entries on every rank.
    Called by all ranks together once the files are written."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return compute(directory, checkpoint_files(directory))
    names = [checkpoint_files(directory) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing: every rank splits the same list
    mine = compute(directory, share(names[0], dist.get_rank(), dist.get_world_size()))
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def agreed_problem(directory: Path, entries: dict[str, list]) -> Optional[str]:
    """Verify `entries` split over the ranks; every rank returns the same answer: the first
    problem (in file order) any rank found, or None."""
    names = sorted(entries)
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return check_entries(directory, entries)
    mine = share(names, dist.get_rank(), dist.get_world_size())
    problem = check_entries(directory, {n: entries[n] for n in mine})
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    problems = [p for p in found if p is not None]
    if not problems:
        return None
    order = {str(directory / n): i for i, n in enumerate(names)}
    return min(problems, key=lambda p: order.get(p.split(": ", 1)[0], len(names)))
