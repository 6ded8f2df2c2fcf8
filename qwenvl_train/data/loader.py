"""The training data pipeline, as a list of steps, with exact resume.

Per data stream (one per dp rank x loader worker), in this order. Step 1 runs here, once;
steps 2-10 are the stages of `Stream.batches` in stream.py (`Stream.samples` and
`Stream.load` spell out 2-7, one call per step):

 1. shards of each source (brace patterns / globs relative to `root`); shards whose
    manifest lists no task the stage template takes are dropped up front
    (`resolve_sources`);
 2. split over streams: whole shards, or samples when shards are too few
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
    stream);
 9. stage 2: first-fit packing of same-task samples (packing.Packer);
10. collate into the batch dict of docs/contracts.md (packing.collate).

`qwenvl-data inspect` and evaluation read records through the same `read_record`.

Error policy: a bad sample raises `SampleError` (reason codes in schema.REASONS; an
unreadable member is `bad_tar`); it is skipped, counted by reason and logged with shard
and key; more than `max_consecutive_bad` in a row raise `DataError`. Any other exception
is a bug and stops the run.

Resume: each stream's position is a handful of integers plus the addresses of samples
buffered in the packer. Every batch travels with its stream's position; the main process
keeps the last position per stream. torch's DataLoader hands out batches round-robin over
workers, so after `t` batches the next one comes from stream `t % workers`; on restore the
workers are relabelled so that physical worker 0 continues that stream.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .reader import expand_sources
from .shards import read_manifests
from .stream import DataError, LoaderSpec, Stream, new_stats
from .templates import ACCEPTS
from .tokenizer import QwenVLTokenizer

log = logging.getLogger("qwenvl_train.data")
STATE_VERSION = 1


class _StreamDataset(IterableDataset):
    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer,
                 cursors: dict[int, dict], offset: int):
        self.spec, self.tok, self.cursors, self.offset = spec, tokenizer, cursors, offset

    def __iter__(self):
        info = get_worker_info()
        n = self.spec.streams_per_rank
        local = (info.id + self.offset) % n if info is not None else 0
        for batch, cursor in Stream(self.spec, self.tok, local, self.cursors.get(local)):
            yield batch, local, cursor


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
    """Iterable of batches (forever) with exact `state_dict()` / `load_state_dict()`."""

    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer):
        self.spec, self.tok = spec, tokenizer
        self._cursors: dict[int, dict] = {}
        self._yielded = 0

    def __iter__(self):
        spec = self.spec
        ds = _StreamDataset(spec, self.tok, dict(self._cursors),
                            self._yielded % spec.streams_per_rank)
        if spec.num_workers == 0:
            it = iter(ds)
        else:
            # Own generator: the workers' base seed must not be drawn from the global RNG,
            # which the model uses (dropout) and a checkpoint restores before this runs.
            it = iter(DataLoader(ds, batch_size=None, num_workers=spec.num_workers,
                                 collate_fn=_identity, prefetch_factor=spec.prefetch_factor,
                                 worker_init_fn=_ignore_stop_signals,
                                 generator=torch.Generator()))
        for batch, local, cursor in it:
            self._cursors[local] = cursor
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "dp_rank": self.spec.dp_rank,
                "dp_size": self.spec.dp_size, "streams_per_rank": self.spec.streams_per_rank,
                "fingerprint": self.spec.fingerprint(), "yielded": self._yielded,
                "streams": {str(k): v for k, v in sorted(self._cursors.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; takes effect at the next `iter()`. An empty state (a
        checkpoint written before any batch) means: start from the beginning."""
        spec = self.spec
        if not state:
            self._cursors, self._yielded = {}, 0
            return
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} != "
                            f"{STATE_VERSION}")
        saved = (state["dp_size"], state["streams_per_rank"])
        now = (spec.dp_size, spec.streams_per_rank)
        if saved != now:
            raise DataError(
                f"cannot resume the data stream exactly: it was saved with dp_size="
                f"{saved[0]} x {saved[1]} loader worker(s) per rank and this run has "
                f"dp_size={now[0]} x {now[1]}. Exact resume needs the same data-parallel "
                "size and data.num_workers (0 and 1 are interchangeable). Run with the "
                "saved layout, or start the data stream afresh (resume without the "
                "loader state).")
        if state["dp_rank"] != spec.dp_rank:
            raise DataError(f"data loader state of dp rank {state['dp_rank']} given to "
                            f"dp rank {spec.dp_rank}")
        fp = spec.fingerprint()
        diff = sorted(k for k in fp if fp[k] != state["fingerprint"].get(k))
        if diff:
            raise DataError(f"cannot resume the data stream: data/stage settings changed "
                            f"since the checkpoint ({', '.join(diff)})")
        self._cursors = {int(k): v for k, v in state["streams"].items()}
        self._yielded = int(state["yielded"])

    def stats(self) -> dict:
        """Cumulative counters over this rank's streams (as of the last yielded batch)."""
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


def resolve_sources(cfg: DataConfig, template: str) -> list[tuple[str, list[str], float]]:
    """Step 1: expand patterns (a source that matches nothing is an error naming it, as
    the launch check `config.validate_launch` reports it); drop shards (and sources) the
    template cannot use."""
    sources = expand_sources(cfg)
    folders = {os.path.dirname(s) for _, shards, _ in sources for s in shards}
    manifests = read_manifests(cfg.root, folders) if cfg.use_manifests else {}
    out = []
    for name, shards, weight in sources:
        usable = [s for s in shards if s not in manifests
                  or set(manifests[s].get("tasks", {})) & ACCEPTS[template]]
        if usable:
            out.append((name, usable, weight))
        else:
            log.info("data: source %s has no %s-template tasks; not used", name, template)
    if not out:
        raise ValueError(f"data.sources: no source has samples that the {template!r} "
                         f"template takes (tasks {sorted(ACCEPTS[template])})")
    return out


def build_loader(data: DataConfig, tokenizer: QwenVLTokenizer, *, template: str,
                 image_size: int, seq_len: int, pack: bool, num_image_tokens: int,
                 dp_rank: int, dp_size: int, micro_batch_size: int, seed: int,
                 num_workers: int | None = None) -> TrainLoader:
    """The trainer's entry point (docs/contracts.md). `data` has passed
    `DataConfig.validate` (config loading runs it); template, image_size, seq_len and pack
    are the stage's. `num_workers` defaults to `data.num_workers`, capped at the CPUs this
    process may use."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    spec = LoaderSpec(
        root=data.root, sources=resolve_sources(data, template), template=template,
        image_size=image_size, seq_len=seq_len, pack=pack, num_image_tokens=num_image_tokens,
        micro_batch_size=micro_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size,
        num_workers=workers_for_this_machine(data.num_workers) if num_workers is None
        else num_workers,
        prefetch_factor=data.prefetch_factor, shuffle=data.shuffle,
        max_consecutive_bad=data.max_consecutive_bad, max_image_pixels=data.max_image_pixels,
        pack_buffer=data.pack_buffer, pad_to_multiple_of=data.pad_to_multiple_of)
    return TrainLoader(spec, tokenizer)
