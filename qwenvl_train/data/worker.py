"""One data stream (what one DataLoader worker of one dp rank runs): steps 2-9 of
loader.py, producing (batch, cursor) pairs, and its resumable position."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .encode import EncodedSample, encode_tokens, to_encoded
from .images import load_image_uint8
from .packing import Packer, collate
from .reader import Entry, ShardFile
from .schema import TASKS, SampleError, parse_record
from .streams import Blender, IndexCache, SourceStream
from .templates import accepts
from .tokenizer import QwenVLTokenizer

log = logging.getLogger("qwenvl_train.data")


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
    prefetch_factor: int = 2
    shuffle: bool = True
    max_consecutive_bad: int = 32
    max_image_pixels: int = 89478485
    pack_buffer: int = 4
    pad_to_multiple_of: int = 8

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same data."""
        d = asdict(self)
        for k in ("dp_rank", "num_workers", "prefetch_factor", "max_consecutive_bad"):
            d.pop(k)
        d["streams_per_rank"] = self.streams_per_rank
        d["sources"] = [[n, len(s), w] for n, s, w in self.sources]
        return json.loads(json.dumps(d))


def new_stats() -> dict:
    return {"skipped": {}, "filtered": 0, "samples": 0, "images": 0, "tokens": 0,
            "slots": 0, "rows": 0, "batches": 0}


class Stream:
    """One data stream: steps 2-9 of loader.py, producing (batch, cursor) forever."""

    def __init__(self, spec: LoaderSpec, tokenizer: QwenVLTokenizer, local_id: int,
                 cursor: dict | None = None):
        self.spec, self.tok = spec, tokenizer
        n = spec.streams_per_rank
        self.g = spec.dp_rank * n + local_id
        cache = IndexCache()
        self.sources = [
            SourceStream(name, spec.root, shards, spec.seed, self.g, spec.dp_size * n,
                         spec.shuffle, cache, self._bad_tar)
            for name, shards, _ in spec.sources]
        self.blender = Blender([w for _, _, w in spec.sources], spec.seed, self.g)
        self.draws = 0
        self.packer = Packer(spec.seq_len, spec.pack_buffer) if spec.pack else None
        self.ready: list[list[EncodedSample]] = []
        self.stats = new_stats()
        self.bad_run = 0
        self._logged: Counter = Counter()
        if cursor is not None:
            self._restore(cursor)

    # ---------------------------------------------------------------- steps 4-6
    def _load(self, address: list, entry: Entry, f: ShardFile) -> EncodedSample | None:
        """One tar entry -> encoded sample; None if the template does not take its task."""
        spec = self.spec
        if "json" not in entry.members:
            raise SampleError("bad_record", "no .json member")
        try:
            record = json.loads(f.read(entry.members["json"]))
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", str(e)) from None
        if isinstance(record, dict) and record.get("task") in TASKS and \
                not accepts(spec.template, record["task"]):
            return None  # filtered before anything else is read
        images = entry.image_members()
        sample = parse_record(record, entry.key, set(images), spec.max_image_pixels)
        tokens = encode_tokens(sample, spec.template, self.tok, spec.num_image_tokens,
                               spec.seq_len)
        s = spec.image_size
        pix = [load_image_uint8(f.read(images[i]), s, max_pixels=spec.max_image_pixels,
                                expected_size=sample.image_sizes[i])
               for i in tokens.image_order]
        stacked = (pix[0].unsqueeze(0) if len(pix) == 1 else torch.stack(pix) if pix
                   else torch.zeros((0, 3, s, s), dtype=torch.uint8))
        return to_encoded(sample, tokens, stacked, address)

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

    def _pull(self, src: SourceStream) -> EncodedSample:
        """Next valid sample of one source (step 7 asks; steps 2-6 answer)."""
        while True:
            address, entry, f = src.next()
            try:
                sample = self._load(address, entry, f)
            except SampleError as e:
                self._skip(e.reason, address[1], entry.key, e.msg)
                continue
            except OSError as e:
                self._skip("bad_tar", address[1], entry.key, str(e))
                continue
            if sample is None:
                self.stats["filtered"] += 1
                continue
            self.bad_run = 0
            src.mark_valid()
            return sample

    def next_sample(self) -> EncodedSample:
        src = self.sources[self.blender.pick(self.draws)]
        self.draws += 1
        return self._pull(src)

    # ---------------------------------------------------------------- steps 8-9
    def next_batch(self) -> dict:
        spec = self.spec
        b = spec.micro_batch_size
        if self.packer is not None:
            while len(self.ready) < b:
                self.ready += self.packer.add(self.next_sample())
            rows, self.ready = self.ready[:b], self.ready[b:]
            batch = collate(rows, self.tok.pad_id, spec.image_size, length=spec.seq_len)
        else:
            rows = [[self.next_sample()] for _ in range(b)]
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

    def __iter__(self):
        while True:
            batch = self.next_batch()
            yield batch, self.cursor()

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
            sample = self._load(list(address), entry, f)
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
