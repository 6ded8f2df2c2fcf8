"""Sources as one stream sees them: each source's sample order (steps 2-3 of loader.py)
and the weighted blend over sources (step 8).

`SourceOrder` says which shard/sample of one source a virtual stream reads next and hands
out its tar entries; `Blender` picks the source of each draw. Every random choice
is a pure function of (seed, names, epoch, counters), so a position of a few integers is
the whole state, and a resumed stream jumps straight back.

Splitting a source over S = data.virtual_streams streams:
* shard mode (>= S shards): each epoch the shard list is permuted (same permutation in
  every stream) and stream g reads shards g, g+S, g+2S, ...;
* sample mode (< S shards, "resampling"): every stream walks all shards in the epoch's
  order and keeps the samples whose running index i in the epoch has i % S == g. It reads
  only tar headers of the samples it does not keep.
Within a shard, samples are read in a per-(shard, epoch) permutation.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import numpy as np

from .reader import Entry, ShardFile, ShardIndex, index_tar


def crc(s: str) -> int:
    return zlib.crc32(s.encode())


def rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


class IndexCache:
    """A few shard indexes per stream (headers only), keyed by path."""

    def __init__(self, size: int = 8):
        self.size = size
        self._d: dict[str, ShardIndex] = {}

    def get(self, path: str) -> ShardIndex:
        if path not in self._d:
            if len(self._d) >= self.size:
                self._d.pop(next(iter(self._d)))
            self._d[path] = index_tar(path)
        return self._d[path]


class SourceOrder:
    """One source's samples in the order one stream reads them (split over streams,
    shuffled per epoch), as (address, tar entry, open shard); the position is a few ints."""

    # position fields, in the order they are stored in a cursor
    FIELDS = ("epoch", "shard", "sample", "run", "valid", "empty")

    def __init__(self, name: str, root: str, shards: list[str], seed: int, stream_id: int,
                 num_streams: int, shuffle: bool, cache: IndexCache,
                 on_bad_tar: Callable[[str, str], None]):
        if not shards:
            raise ValueError(f"source {name!r} has no shards")
        self.name, self.root, self.shards = name, root, shards
        self.seed, self.g, self.n_streams = seed, stream_id, num_streams
        self.shuffle, self.cache, self.on_bad_tar = shuffle, cache, on_bad_tar
        self.mode = "shard" if len(shards) >= num_streams else "sample"
        self.pos = dict.fromkeys(self.FIELDS, 0)
        self._file: ShardFile | None = None
        self._file_key: tuple[int, int] | None = None
        self._shards_epoch, self._epoch_shards = -1, []
        self._order_key: tuple | None = None
        self._order: list[int] = []

    # -- pure functions of (seed, epoch)
    def epoch_shards(self, epoch: int) -> list[str]:
        if self._shards_epoch != epoch:
            order = (rng(self.seed, crc(self.name), epoch).permutation(len(self.shards))
                     if self.shuffle else range(len(self.shards)))
            shards = [self.shards[i] for i in order]
            self._shards_epoch = epoch
            self._epoch_shards = (shards[self.g::self.n_streams] if self.mode == "shard"
                                  else shards)
        return self._epoch_shards

    def sample_order(self, shard: str, epoch: int, n: int) -> list[int]:
        if self._order_key != (shard, epoch, n):
            self._order_key = (shard, epoch, n)
            self._order = (rng(self.seed, crc(shard), epoch).permutation(n).tolist()
                           if self.shuffle else list(range(n)))
        return self._order

    def path(self, shard: str) -> str:
        return os.path.join(self.root, shard)  # an absolute shard path stays as it is

    # -- state
    def state(self) -> list[int]:
        return [self.pos[f] for f in self.FIELDS]

    def load(self, state: list[int]) -> None:
        self.pos = dict(zip(self.FIELDS, (int(v) for v in state), strict=True))
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._file_key = None, None

    # -- iteration
    def next(self) -> tuple[list, Entry, ShardFile]:
        """Next candidate (address, tar entry, open shard); advances the position."""
        p = self.pos
        while True:
            shards = self.epoch_shards(p["epoch"])
            if p["shard"] >= len(shards):
                self._end_epoch()
                continue
            shard = shards[p["shard"]]
            index = self.cache.get(self.path(shard))
            if self._file_key != (p["epoch"], p["shard"]):
                self.close()
                if index.error and p["sample"] == 0:  # report once per shard visit
                    self.on_bad_tar(shard, index.error)
                self._file = ShardFile(index.path)
                self._file_key = (p["epoch"], p["shard"])
            if p["sample"] >= len(index.entries):
                p["shard"] += 1
                p["sample"] = 0
                continue
            i = p["sample"]
            p["sample"] += 1
            p["run"] += 1
            if self.mode == "sample" and (p["run"] - 1) % self.n_streams != self.g:
                continue
            entry = index.entries[self.sample_order(shard, p["epoch"], len(index.entries))[i]]
            return [self.name, shard, p["epoch"], i], entry, self._file

    def _end_epoch(self) -> None:
        p = self.pos
        p["empty"] = p["empty"] + 1 if p["valid"] == 0 else 0
        limit = 1 if self.mode == "sample" else 16
        if p["empty"] >= limit:
            raise RuntimeError(
                f"data source {self.name!r}: virtual stream {self.g} of {self.n_streams} found "
                f"no usable sample in {p['empty']} epoch(s) over {len(self.shards)} shard(s) "
                f"({self.mode} mode). Too few samples for data.virtual_streams="
                f"{self.n_streams} (a new run can use fewer), or none that the stage template "
                "accepts: check the source's shards and weights.")
        p.update(epoch=p["epoch"] + 1, shard=0, sample=0, run=0, valid=0)
        self.close()

    def mark_valid(self) -> None:
        self.pos["valid"] += 1

    def refetch(self, address: list) -> tuple[Entry, ShardFile]:
        """The entry at `address` (from a cursor); the caller closes the file."""
        _, shard, epoch, i = address
        index = self.cache.get(self.path(shard))
        entry = index.entries[self.sample_order(shard, int(epoch), len(index.entries))[int(i)]]
        return entry, ShardFile(index.path)


class Blender:
    """Draw k of a stream picks a source with probability proportional to its weight."""

    BLOCK = 4096

    def __init__(self, weights: list[float], seed: int, stream_id: int):
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.seed, self.g = seed, stream_id
        self._block, self._u = -1, np.empty(0)

    def pick(self, k: int) -> int:
        block = k // self.BLOCK
        if block != self._block:
            self._block = block
            self._u = rng(self.seed, self.g, block, 0xB1E).random(self.BLOCK)
        i = int(np.searchsorted(self.cum, self._u[k % self.BLOCK], side="right"))
        return min(i, len(self.cum) - 1)
