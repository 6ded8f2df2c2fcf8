"""Throughput of the checkpoint checksum (xxh3-64, training/checkpoint_files.py) against
zlib's crc32 and sha256, in memory and over a file read from the page cache.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/bench_checksum.py [--mb 512]

A save hashes every file of the new checkpoint once (read back from the page cache right
after it was written) and a resume hashes the checkpoint it loads, each split over the ranks
(`checkpoint_files.shares`): the time per rank is its share's bytes over the file rate
printed here. Prints the best of 3 rounds (CPU time: steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import xxhash

from qwenvl_train.training.checkpoint_files import file_checksum


def _best_mb_per_s(fn: Callable[[], object], mb: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return mb / best


def _crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _read_only(path: Path) -> None:
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _in_memory(data: bytes, mb: int) -> None:
    print(f"in memory, {mb} MiB:")
    for name, fn in (("xxh3_64", lambda: xxhash.xxh3_64_intdigest(data)),
                     ("zlib.crc32", lambda: zlib.crc32(data)),
                     ("sha256", lambda: hashlib.sha256(data).digest())):
        print(f"  {name:<12} {_best_mb_per_s(fn, mb):>8,.0f} MB/s")


def _from_page_cache(path: Path, mb: int) -> None:
    _read_only(path)  # into the page cache, as right after a save
    print(f"a {mb} MiB file from the page cache:")
    for name, fn in (("read only", lambda: _read_only(path)),
                     ("xxh3_64", lambda: file_checksum(path)),
                     ("zlib.crc32", lambda: _crc32_file(path))):
        print(f"  {name:<12} {_best_mb_per_s(fn, mb):>8,.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the test data (MiB)")
    mb = parser.parse_args().mb
    data = os.urandom(mb << 20)
    _in_memory(data, mb)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.bin"
        path.write_bytes(data)
        _from_page_cache(path, mb)


if __name__ == "__main__":
    main()
