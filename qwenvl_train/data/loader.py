"""The training data pipeline, as a list of steps, with exact resume under any layout.

Per virtual stream (global_order.py: V of them, fixed for a run, dealt to the dp ranks'
loader workers), in this order. Step 1 runs here, once; steps 2-10 are the stages of
`Stream.batches` in stream.py (`Stream.samples` and `Stream.load` spell out 2-7, one call
per step); steps 11-12 run in the training process of each reading rank:

 1. shards of each source (brace patterns / globs relative to `root`); shards whose
    manifest lists no task the stage template takes are dropped up front
    (`resolve_sources`);
 2. split over the V virtual streams: whole shards, or samples when shards are too few
    (sources.SourceOrder);
 3. tolerant tar reading: headers indexed, members read by seek (reader.py);
 4. JSON record + task filter: samples the stage template does not take are dropped HERE,
    before any image is read or decoded (records.read_record);
 5. typed sample, validated, with its image bytes (records.parse_record; images declared
    larger than `max_image_pixels` are dropped here);
 6. template + tokenise + truncate (encode.encode_tokens), so a too-long sample is also
    dropped before its images are decoded;
 7. decode + resize the images the tokens use (images.decode_images);
 8. weighted blending of sources (sources.Blender; deterministic draws per seed and
    virtual stream);
 9. stage 2: first-fit packing of same-task samples (packing.Packer), inside the virtual
    stream, so rows do not depend on the layout;
10. collate into the batch dict of docs/contracts.md (packing.collate), images uint8;
11. assemble the global step: micro-batch m of the run comes from virtual stream m mod V
    (global_order.py); each rank collects the ones its workers read;
12. balance: the step's micro-batches are assigned to dp ranks by estimated cost
    (balance.py; the estimate is the trainer's FLOP formula), those changing owner are
    sent over (training/elastic.py); images are CLIP-normalised as a micro-batch is handed
    to the trainer.

`qwenvl-data inspect` and evaluation read records through the same `read_record`.

Error policy: a bad sample raises `SampleError` (reason codes in schema.REASONS; an
unreadable member is `bad_tar`); it is skipped, counted by reason and logged with shard
and key; more than `max_consecutive_bad` in a row raise `DataError`. Any other exception
is a bug and stops the run.

Resume: a virtual stream's position is a handful of integers plus the addresses of
samples buffered in its packer; the data state is every virtual stream's position and the
step reached (one global object, written once per checkpoint), so a resume under another
dp size or worker count finds each stream's position wherever the stream is now read.
Each loader worker hands over exactly `GlobalOrder.slots` items per step (placeholders
where it has fewer micro-batches), so torch's round-robin over workers always starts a
step at worker 0.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .balance import assign, straggler_ratio
from .config import DataConfig
from .global_order import GlobalOrder, check_cover
from .selection import resolve_sources
from .stream import DataError, LoaderSpec, Stream, new_stats
from .tokenizer import QwenVLTokenizer

log = logging.getLogger("qwenvl_train.data")
STATE_VERSION = 2


class Exchange(Protocol):
    """Collectives over the data-parallel readers (training/elastic.py implements them)."""

    layout: dict  # the layout that writes a checkpoint (world size, pp, tp, dp, zero stage)

    def all_costs(self, first: int, count: int, local: dict[int, float]) -> list[float]:
        """Costs of micro-batches first..first+count-1; each rank knows those it read."""

    def move(self, moves: list[tuple[int, int, int]], batches: dict[int, dict]
             ) -> dict[int, dict]:
        """Send each (m, src, dst) micro-batch from rank src to dst; returns those received."""

    def gather(self, obj: dict) -> list[dict]:
        """Every reader's `obj`, in dp-rank order, on every reader."""


class _ReaderDataset(IterableDataset):
    """One loader worker: the virtual streams dealt to it, micro-batches in global order,
    each step's share padded with placeholders to `GlobalOrder.slots`."""

    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer, order: GlobalOrder,
                 cursors: dict[int, dict], start_step: int):
        self.spec, self.tok, self.order = spec, tokenizer, order
        self.cursors, self.start_step = cursors, start_step

    def __iter__(self):
        info = get_worker_info()
        order, rank = self.order, self.spec.dp_rank
        worker = info.id if info is not None else 0
        streams = {v: iter(Stream(self.spec, self.tok, v, self.cursors.get(v)))
                   for v in order.streams_of(rank, worker)}
        for step in itertools.count(self.start_step):
            mine = order.produced_by(step, rank, worker)
            for m in mine:
                batch, cursor = next(streams[order.stream(m)])
                batch["micro_batch"] = m
                yield m, batch, cursor
            for _ in range(order.slots(step, rank) - len(mine)):
                yield -1, None, None


def _ignore_stop_signals(_worker_id: int) -> None:
    """torchrun and SLURM signal the whole process group on preemption (SIGTERM), and so
    does the terminal on Ctrl-C (SIGINT); a worker that died of it would make the trainer
    fail before it can save its checkpoint. The trainer owns shutdown: workers ignore both
    and end with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def workers_for_this_machine(requested: int) -> int:
    """`requested` loader workers, at most one per CPU this process may use: more only
    compete for the same cores (DataLoader warns). Logged when it caps."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if requested > (cpus or 1):
        log.info("data: %d loader workers asked for (data.num_workers), %d CPU(s) available "
                 "to this process: using %d", requested, cpus or 1, cpus or 1)
        return cpus or 1
    return requested


def _identity(x):
    return x


class TrainLoader:
    """Iterable of this rank's micro-batches (forever), step by step, with exact
    `state_dict()` / `load_state_dict()` at step boundaries."""

    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer,
                 exchange: Exchange | None = None,
                 cost: Callable[[dict], float] | None = None):
        self.spec, self.tok, self.exchange, self.cost = spec, tokenizer, exchange, cost
        self.order = GlobalOrder(spec.virtual_streams, spec.micro_per_step, spec.dp_size,
                                 spec.readers_per_rank)
        self._cursors: dict[int, dict] = {}  # virtual stream -> position (streams read here)
        self._step = 0  # global steps handed out
        self.last_balance: dict = {}  # the last step's estimated balance (for logs, tests)

    def __iter__(self):
        spec, order = self.spec, self.order
        ds = _ReaderDataset(spec, self.tok, order, dict(self._cursors), self._step)
        if spec.num_workers == 0:
            items = iter(ds)
        else:
            # Own generator: the workers' base seed must not be drawn from the global RNG,
            # which the model uses (dropout) and a checkpoint restores before this runs.
            items = iter(DataLoader(ds, batch_size=None, num_workers=spec.num_workers,
                                    collate_fn=_identity, prefetch_factor=spec.prefetch_factor,
                                    worker_init_fn=_ignore_stop_signals,
                                    generator=torch.Generator()))
        while True:
            produced, cursors = {}, {}
            for _ in range(order.slots(self._step, spec.dp_rank) * order.workers):
                m, batch, cursor = next(items)
                if batch is not None:
                    produced[m] = batch
                    cursors[order.stream(m)] = cursor
            mine = self._distribute(self._step, produced)
            self._cursors.update(cursors)
            self._step += 1
            for batch in mine:
                yield batch

    def _distribute(self, step: int, produced: dict[int, dict]) -> list[dict]:
        """This rank's micro-batches of `step`, ascending: balance.py decides who trains
        which; the exchange moves those that change owner."""
        order, spec = self.order, self.spec
        micro = order.step_micro(step)
        producers = [order.producer(m) for m in micro]
        if spec.dp_size == 1 or self.exchange is None or (
                self.cost is None and spec.virtual_streams % spec.dp_size == 0):
            return [produced[m] for m in micro if m in produced]
        local = {m: self.cost(b) if self.cost else 0.0 for m, b in produced.items()}
        costs = self.exchange.all_costs(micro.start, len(micro), local)
        owners = assign(costs, producers, spec.dp_size)
        moves = [(m, p, o) for m, p, o in zip(micro, producers, owners, strict=True) if p != o]
        mine = {m: b for m, b in produced.items() if owners[m - micro.start] == spec.dp_rank}
        mine.update(self.exchange.move(moves, produced))
        self.last_balance = {
            "before": straggler_ratio(costs, producers, spec.dp_size),
            "after": straggler_ratio(costs, owners, spec.dp_size), "moved": len(moves)}
        return [mine[m] for m in sorted(mine)]

    def state_dict(self) -> dict:
        """The data position at the last step boundary. With an exchange this is a
        collective over the readers and returns every virtual stream's position (the same
        dict on every reader): a resume under any layout finds each stream's state."""
        spec = self.spec
        streams = {str(v): c for v, c in self._cursors.items()}
        layout = {"dp": spec.dp_size, "num_workers": spec.num_workers}
        if self.exchange is not None:
            layout.update(self.exchange.layout)
            if spec.dp_size > 1:
                streams = {k: c for part in self.exchange.gather(streams)
                           for k, c in part.items()}
        return {"version": STATE_VERSION, "fingerprint": spec.fingerprint(),
                "step": self._step, "layout": layout,
                "streams": dict(sorted(streams.items(), key=lambda kv: int(kv[0])))}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position (any layout's); takes effect at the next `iter()`. An empty
        state (a checkpoint written before any batch) means: start from the beginning."""
        spec = self.spec
        if not state:
            self._cursors, self._step = {}, 0
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data loader state version {state.get('version')} != {STATE_VERSION}: the "
                "checkpoint was written before the layout-independent sample order; resume "
                "it with the code that wrote it, or start the stage in a new run_dir")
        fp = spec.fingerprint()
        diff = sorted(k for k in fp if fp[k] != state["fingerprint"].get(k))
        if diff:
            raise DataError(f"cannot resume the data stream: data/stage settings changed "
                            f"since the checkpoint ({', '.join(diff)})")
        step = int(state["step"])
        streams = state["streams"]
        mine = [v for w in range(self.order.workers)
                for v in self.order.streams_of(spec.dp_rank, w)]
        # A stream has read something iff its first micro-batch (m = v) is behind us.
        missing = [v for v in mine if v < step * spec.micro_per_step and str(v) not in streams]
        if missing:
            raise DataError(f"the data state lacks virtual stream(s) {missing[:8]} of dp rank "
                            f"{spec.dp_rank}: it holds only {len(streams)} of "
                            f"{spec.virtual_streams}; pass the global state (every reader's)")
        self._cursors = {v: streams[str(v)] for v in mine if str(v) in streams}
        self._step = step

    def stats(self) -> dict:
        """Cumulative counters over the virtual streams this rank reads (as of the last
        step handed out); summed over ranks they are the run's."""
        total = new_stats()
        for c in self._cursors.values():
            for k, v in c["stats"].items():
                if k == "skipped":
                    for r, n in v.items():
                        total["skipped"][r] = total["skipped"].get(r, 0) + n
                else:
                    total[k] += v
        total["skipped_total"] = sum(total["skipped"].values())
        for reason, n in total["skipped"].items():  # flat numbers for metric loggers
            total[f"skipped_{reason}"] = n
        total["packing_efficiency"] = total["tokens"] / total["slots"] if total["slots"] else 0.0
        return total


def build_loader(data: DataConfig, tokenizer: QwenVLTokenizer, *, template: str,
                 image_size: int, seq_len: int, pack: bool, num_image_tokens: int,
                 dp_rank: int, dp_size: int, micro_batch_size: int, seed: int,
                 num_workers: int | None = None, global_batch_size: int | None = None,
                 exchange: Exchange | None = None,
                 cost: Callable[[dict], float] | None = None) -> TrainLoader:
    """The trainer's entry point (docs/contracts.md). `data` has passed
    `DataConfig.validate` (config loading runs it); template, image_size, seq_len and pack
    are the stage's. `num_workers` defaults to `data.num_workers`, capped at the
    CPUs this process may use; `global_batch_size`
    (rows per step) to one micro-batch per rank. `exchange` (training/elastic.py) lets
    ranks trade micro-batches, `cost` (micro-batch -> estimated cost) turns on balancing;
    without an exchange each rank trains what it reads, which needs dp | V."""
    spec = loader_spec(data, template=template, image_size=image_size, seq_len=seq_len,
                       pack=pack, num_image_tokens=num_image_tokens, dp_rank=dp_rank,
                       dp_size=dp_size, micro_batch_size=micro_batch_size, seed=seed,
                       num_workers=num_workers, global_batch_size=global_batch_size)
    if exchange is None and spec.virtual_streams % dp_size:
        raise ValueError(f"data.virtual_streams={spec.virtual_streams} is not a multiple of "
                         f"dp={dp_size}: ranks read unequal shares, which needs an exchange")
    return TrainLoader(spec, tokenizer, exchange, cost)


def loader_spec(data: DataConfig, *, template: str, image_size: int, seq_len: int,
                pack: bool, num_image_tokens: int, dp_rank: int, dp_size: int,
                micro_batch_size: int, seed: int, num_workers: int | None = None,
                global_batch_size: int | None = None) -> LoaderSpec:
    """What a loader reads, checked (build_loader's arguments); `.fingerprint()` is what a
    resume must match."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    workers = workers_for_this_machine(data.num_workers) if num_workers is None else num_workers
    rows = global_batch_size or micro_batch_size * dp_size
    if rows % (micro_batch_size * dp_size):
        raise ValueError(f"global batch {rows} is not a multiple of micro batch "
                         f"{micro_batch_size} x dp {dp_size}")
    check_cover(data.virtual_streams, dp_size, workers)
    return LoaderSpec(
        root=data.root, sources=resolve_sources(data, template), template=template,
        image_size=image_size, seq_len=seq_len, pack=pack, num_image_tokens=num_image_tokens,
        micro_batch_size=micro_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
        num_workers=workers, virtual_streams=data.virtual_streams, global_batch_size=rows,
        prefetch_factor=data.prefetch_factor, shuffle=data.shuffle,
        max_consecutive_bad=data.max_consecutive_bad, max_image_pixels=data.max_image_pixels,
        pack_buffer=data.pack_buffer, pad_to_multiple_of=data.pad_to_multiple_of)
