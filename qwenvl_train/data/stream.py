"""One virtual stream (global_order.py): a loader worker runs the few it is dealt.
`Stream.batches` is steps 2-10 of loader.py written out in order, one named stage per line
(steps 2-7 of a source in `samples` and `load`, one call per step); the stream yields
(micro-batch, cursor) pairs, the cursor being its resumable position. Nothing in a stream
depends on the layout (dp size, workers): only on its id v of `virtual_streams`.

Each stage is a generator over the one before. Everything a stage keeps between two
batches lives on the Stream (source positions, draws, packer, ready rows), never inside a
generator, so the cursor taken after a batch is the whole position.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .config import MAX_IMAGE_PIXELS
from .encode import EncodedSample, encode_tokens, to_encoded
from .images import decode_images
from .packing import Packer, collate
from .reader import Entry, ShardFile
from .records import read_record
from .schema import SampleError
from .sources import Blender, IndexCache, SourceOrder
from .templates import ACCEPTS
from .tokenizer import QwenVLTokenizer

log = logging.getLogger("qwenvl_train.data")

Rows = list[list[EncodedSample]]  # one micro-batch: rows of (packed) samples


class DataError(RuntimeError):
    """Fatal data problem (too many bad samples in a row, incompatible resume state)."""


@dataclass
class LoaderSpec:
    """Everything a stream needs; plain data so it pickles into worker processes."""

    root: str
    sources: list[tuple[str, list[str], float]]  # (name, shard paths relative to root, w)
    template: str
    image_size: int
    seq_len: int
    pack: bool
    num_image_tokens: int
    micro_batch_size: int
    seed: int
    dp_rank: int
    dp_size: int
    num_workers: int  # DataLoader workers (0 = in the training process)
    virtual_streams: int = 1  # V: fixed for a run (global_order.py)
    global_batch_size: int = 0  # rows per step; 0 = micro_batch_size x dp_size
    prefetch_factor: int = 2
    shuffle: bool = True
    max_consecutive_bad: int = 32
    max_image_pixels: int = MAX_IMAGE_PIXELS
    pack_buffer: int = 4
    pad_to_multiple_of: int = 8

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def micro_per_step(self) -> int:
        """M: micro-batches in one global step."""
        return (self.global_batch_size or self.micro_batch_size * self.dp_size) \
            // self.micro_batch_size

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same data. The layout (dp
        rank and size, loader workers) is not part of it."""
        d = asdict(self)
        for k in ("dp_rank", "dp_size", "num_workers", "prefetch_factor",
                  "max_consecutive_bad", "global_batch_size"):
            d.pop(k)
        d["micro_per_step"] = self.micro_per_step
        d["sources"] = [[n, len(s), w] for n, s, w in self.sources]
        return json.loads(json.dumps(d))


def new_stats() -> dict:
    return {"skipped": {}, "filtered": 0, "samples": 0, "images": 0, "tokens": 0,
            "slots": 0, "rows": 0, "batches": 0}


class Stream:
    """One data stream: steps 2-10 of loader.py, producing (batch, cursor) forever."""

    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer, stream_id: int,
                 cursor: dict | None = None):
        self.spec, self.tok = spec, tokenizer
        self.g = stream_id  # virtual stream v of spec.virtual_streams
        cache = IndexCache()
        self.sources = [
            SourceOrder(name, spec.root, shards, spec.seed, self.g, spec.virtual_streams,
                        spec.shuffle, cache, self._bad_tar)
            for name, shards, _ in spec.sources]
        self.blender = Blender([w for _, _, w in spec.sources], spec.seed, self.g)
        self.draws = 0
        self.packer = Packer(spec.seq_len, spec.pack_buffer) if spec.pack else None
        self.ready: Rows = []
        self.stats = new_stats()
        self.bad_run = 0
        self._logged: Counter = Counter()
        if cursor is not None:
            self._restore(cursor)

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        for batch in self.batches():
            yield batch, self.cursor()

    # ---------------------------------------------------------------- the pipeline
    def batches(self) -> Iterator[dict]:
        """Steps 2-10 of loader.py, in their order."""
        per_source = [self.samples(src) for src in self.sources]  # 2-7, one chain per source
        samples = self.blend(per_source)  # 8
        rows = self.pack(samples)  # 9
        return map(self.collate, rows)  # 10

    def samples(self, src: SourceOrder) -> Iterator[EncodedSample]:
        """Steps 2-7 of one source: its tar entries in this stream's order, each loaded;
        bad ones skipped and counted."""
        while True:
            address, entry, shard = src.next()  # 2 split over streams, 3 tolerant tar read
            try:
                sample = self.load(address, entry, shard)
            except SampleError as e:
                self._skip(e.reason, address[1], entry.key, e.msg)
                continue
            if sample is None:
                self.stats["filtered"] += 1
                continue
            self.bad_run = 0
            src.mark_valid()
            yield sample

    def load(self, address: list, entry: Entry, shard: ShardFile) -> EncodedSample | None:
        """Steps 4-7 of one tar entry; None if the stage template does not take its task.
        Cheap checks first: no image is read for a filtered task, none decoded for a
        sample that is too long."""
        spec = self.spec
        record = read_record(entry, shard, max_image_pixels=spec.max_image_pixels,
                             tasks=ACCEPTS[spec.template])  # 4 task filter, 5 typed sample
        if record is None:
            return None
        tokens = encode_tokens(record.sample, spec.template, self.tok,
                               spec.num_image_tokens, spec.seq_len)  # 6 template, tokenise
        images = decode_images(record.sample, tokens.image_order, spec.image_size,
                               max_pixels=spec.max_image_pixels)  # 7
        return to_encoded(record.sample, tokens, images, address)

    def blend(self, per_source: list[Iterator[EncodedSample]]) -> Iterator[EncodedSample]:
        """Step 8: draw k takes the next sample of the source `Blender` picks for k."""
        while True:
            i = self.blender.pick(self.draws)
            self.draws += 1
            yield next(per_source[i])

    def pack(self, samples: Iterator[EncodedSample]) -> Iterator[Rows]:
        """Step 9: micro-batches of rows; first-fit packing of same-task samples (rows it
        completes wait in `ready`), or one sample per row."""
        b = self.spec.micro_batch_size
        while True:
            if self.packer is None:
                yield [[next(samples)] for _ in range(b)]
                continue
            while len(self.ready) < b:
                self.ready += self.packer.add(next(samples))
            rows, self.ready = self.ready[:b], self.ready[b:]
            yield rows

    def collate(self, rows: Rows) -> dict:
        """Step 10: rows -> the batch dict of docs/contracts.md, images uint8 (the model
        normalises them on its device: 4x less to hold for a step, to move between ranks
        and to send to the trainer); counts what went in."""
        spec = self.spec
        if self.packer is not None:
            batch = collate(rows, self.tok.pad_id, spec.image_size, length=spec.seq_len)
        else:
            batch = collate(rows, self.tok.pad_id, spec.image_size,
                            pad_to_multiple_of=spec.pad_to_multiple_of, max_len=spec.seq_len)
        st = self.stats
        st["samples"] += batch["num_samples"]
        st["images"] += batch["num_images"]
        st["tokens"] += batch["num_real_tokens"]
        st["slots"] += batch["input_ids"].numel()
        st["rows"] += len(rows)
        st["batches"] += 1
        return batch

    # ---------------------------------------------------------------- skips
    def _skip(self, reason: str, shard: str, key: str, msg: str) -> None:
        sk = self.stats["skipped"]
        sk[reason] = sk.get(reason, 0) + 1
        self.bad_run += 1
        self._logged[reason] += 1
        if self._logged[reason] <= 20 or self._logged[reason] % 1000 == 0:
            log.warning("data: skipped %s (%d so far) shard=%s key=%s: %s", reason,
                        sk[reason], shard, key, msg)
        if self.bad_run > self.spec.max_consecutive_bad:
            raise DataError(
                f"{self.bad_run} bad samples in a row (data.max_consecutive_bad="
                f"{self.spec.max_consecutive_bad}); last: {reason} in shard {shard} key "
                f"{key}: {msg}. Skipped so far: {sk}. The shards look broken; check them "
                "with `qwenvl-data inspect`.")

    def _bad_tar(self, shard: str, msg: str) -> None:
        self._skip("bad_tar", shard, "-", msg)

    # ---------------------------------------------------------------- state
    def cursor(self) -> dict:
        """JSON-able position after the last batch (plus cumulative stats)."""
        return {
            "sources": {s.name: s.state() for s in self.sources},
            "draws": self.draws,
            "bad_run": self.bad_run,
            "open_rows": self.packer.state() if self.packer else [],
            "ready_rows": [[s.address for s in row] for row in self.ready],
            "stats": json.loads(json.dumps(self.stats)),
        }

    def _refetch(self, address: list) -> EncodedSample:
        src = next(s for s in self.sources if s.name == address[0])
        entry, f = src.refetch(address)
        try:
            sample = self.load(list(address), entry, f)
        finally:
            f.close()
        if sample is None:
            raise DataError(f"resume: buffered sample {address} no longer loads")
        return sample

    def _restore(self, c: dict) -> None:
        for s in self.sources:
            s.load(c["sources"][s.name])
        self.draws, self.bad_run = int(c["draws"]), int(c["bad_run"])
        self.stats = json.loads(json.dumps(c["stats"]))
        # Samples that were read but not yet batched are re-read by address (a few).
        if self.packer is not None:
            self.packer.restore([(task, [self._refetch(a) for a in addrs])
                                 for task, addrs in c["open_rows"]])
        self.ready = [[self._refetch(a) for a in row] for row in c["ready_rows"]]
