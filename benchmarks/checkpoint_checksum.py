"""What checksumming checkpoint files costs (megamor/checksums.py), per GB, against reading them.

    python benchmarks/checkpoint_checksum.py [--gb 2] [--files 8] [--repeat 3] [--dir DIR]

Writes `--files` files of random bytes, `--gb` GB in all, under DIR (default: a temporary
directory), then, interleaved `--repeat` times and per file:

- read: the file in 16 MiB chunks into one buffer (the floor: what reading costs anyway);
- read + xxh3_128: what megamor does after a save and before a load (`checksums.hash_file`);
- read + sha256 and read + crc32 (zlib): the alternatives, for comparison;

each once with the file in the page cache ("warm": a save hashes what it just wrote) and once
after dropping the file's cached pages with posix_fadvise ("cold": what a load from disk pays).
Prints seconds per GB (median over the repeats) and each ratio to the read alone, side by side.
The hash is per core: a checkpoint's files are split over the ranks that save or load it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamor.checksums import hash_file  # noqa: E402

CHUNK = 16 * 2**20


def read_only(path: Path) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def read_with(update):
    def run(path: Path) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                update(view[:n])
    return run


def sha256(path: Path) -> None:
    h = hashlib.sha256()
    read_with(h.update)(path)
    h.hexdigest()


def crc32(path: Path) -> None:
    state = [0]

    def update(b):
        state[0] = zlib.crc32(b, state[0])
    read_with(update)(path)


METHODS = {"read": read_only, "read + xxh3_128 (megamor)": hash_file, "read + sha256": sha256,
           "read + crc32": crc32}


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        size = int(args.gb * 1e9 / args.files)
        files = [Path(tmp) / f"__{i}_0.distcp" for i in range(args.files)]
        for f in files:
            with open(f, "wb") as out:
                left = size
                while left:
                    n = min(left, 64 * 2**20)
                    out.write(os.urandom(n))
                    left -= n
        total_gb = size * len(files) / 1e9
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for cache in ("warm", "cold"):
                for name, fn in METHODS.items():  # interleaved: drift hits every method alike
                    if cache == "warm":
                        for f in files:
                            read_only(f)
                    else:
                        for f in files:
                            drop_cache(f)
                    t0 = time.perf_counter()
                    for f in files:
                        fn(f)
                    times.setdefault((cache, name), []).append(
                        (time.perf_counter() - t0) / total_gb)
    print(f"{len(files)} files, {total_gb:.2f} GB, median of {args.repeat}; seconds per GB "
          f"(ratio to reading alone)")
    print(f"| method | warm cache s/GB | cold cache s/GB |")
    print("|---|---|---|")
    base = {c: statistics.median(times[(c, "read")]) for c in ("warm", "cold")}
    for name in METHODS:
        cells = []
        for cache in ("warm", "cold"):
            s = statistics.median(times[(cache, name)])
            cells.append(f"{s:.3f} ({s / base[cache]:.2f}x)")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
