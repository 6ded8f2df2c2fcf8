"""The global sample order: which virtual stream makes each micro-batch, and who reads it.

A run has V virtual streams (`data.virtual_streams`, fixed for the whole run). Virtual
stream v is one `Stream` (stream.py) with id v of V: its share of every source's shards,
its blending draws and its packer depend on (seed, v, V) only. The run's micro-batches
are numbered m = 0, 1, 2, ...; the rule

    micro-batch m  =  micro-batch number (m div V) of virtual stream (m mod V)
    global step t  =  micro-batches [t*M, (t+1)*M),   M = global_batch_size / micro_batch_size

mentions neither ranks nor loader workers, so the rows of every step (which samples,
packed how, in which order) are the same under any layout. A micro-batch is the unit:
the trainer's loss is a mean per micro-batch, so keeping its rows together keeps the
objective of a step independent of who trains which micro-batch.

Readers: virtual stream v is read by data-parallel rank (v mod dp), in that rank's loader
worker ((v div dp) mod workers). When dp divides V, every rank reads exactly M/dp
micro-batches of each step; balance.py then decides who trains which.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl_train.checks import ConfigError


@dataclass(frozen=True)
class GlobalOrder:
    virtual_streams: int  # V
    micro_per_step: int  # M
    dp_size: int
    workers: int  # readers per rank: max(1, data.num_workers)

    def stream(self, m: int) -> int:
        """The virtual stream that makes micro-batch m."""
        return m % self.virtual_streams

    def reader(self, v: int) -> tuple[int, int]:
        """(dp rank, loader worker) that reads virtual stream v."""
        return v % self.dp_size, (v // self.dp_size) % self.workers

    def producer(self, m: int) -> int:
        """The dp rank that reads micro-batch m."""
        return self.reader(self.stream(m))[0]

    def step_micro(self, step: int) -> range:
        return range(step * self.micro_per_step, (step + 1) * self.micro_per_step)

    def streams_of(self, rank: int, worker: int) -> list[int]:
        return [v for v in range(self.virtual_streams) if self.reader(v) == (rank, worker)]

    def produced_by(self, step: int, rank: int, worker: int) -> list[int]:
        """Micro-batches of `step` read by (rank, worker), ascending."""
        return [m for m in self.step_micro(step) if self.reader(self.stream(m)) == (rank, worker)]

    def slots(self, step: int, rank: int) -> int:
        """Items each loader worker of `rank` hands over for `step` (its micro-batches,
        padded with placeholders to the busiest worker's count), so that the DataLoader's
        round-robin over workers stays aligned with steps."""
        return max(len(self.produced_by(step, rank, w)) for w in range(self.workers))


def check_cover(virtual_streams: int, dp_size: int, workers: int, *,
                key: str = "data.virtual_streams") -> None:
    """Every reader (dp rank x loader worker) needs at least one virtual stream; raises
    ConfigError (a ValueError) naming the numbers."""
    readers = dp_size * max(1, workers)
    if virtual_streams >= readers:
        return
    fix = (f"data.num_workers <= {virtual_streams // dp_size}" if virtual_streams >= dp_size
           else f"at most {virtual_streams} data-parallel ranks")
    raise ConfigError(
        f"{key}={virtual_streams} cannot be dealt to dp={dp_size} x {max(1, workers)} loader "
        f"worker(s) = {readers} readers: each needs at least one virtual stream. Use {fix}, "
        f"or start a new run with {key} >= {readers} (a multiple of every dp x workers you "
        "plan to use).")
