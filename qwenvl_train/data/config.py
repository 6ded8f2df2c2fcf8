"""`DataConfig`: the `data` Hydra group (an OmegaConf structured schema)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALL_SHARDS = "**/*.tar"
MAX_IMAGE_PIXELS = 89478485  # PIL's decompression-bomb limit
TEMPLATES = ("pretrain", "multitask", "sft")  # stage templates (templates.py)


@dataclass
class SourceConfig:
    """One named data source: shard patterns relative to `DataConfig.root` and a weight."""

    shards: str = "*.tar"  # brace pattern and/or glob; several separated by spaces
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "demo"
    root: str = "demo_data"
    # name -> source. Sources a stage template cannot use (per the shard manifests) are
    # dropped for that stage and the remaining weights renormalised. Empty: one source
    # "all" = every .tar under root. (Empty by default because OmegaConf merges dicts key
    # by key: a non-empty default would survive in every YAML that names its own sources.)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # Shards named on the command line, one source per entry, added to `sources`:
    # `PATTERN` or `PATTERN:WEIGHT` (weight 1 when omitted), PATTERN a path, glob or brace
    # pattern, absolute or relative to `root` (see `parse_shards_entry`).
    shards: list[str] = field(default_factory=list)
    num_workers: int = 1
    # V: the run's sample order is made by V virtual streams, dealt to the dp ranks' loader
    # workers (data/global_order.py). Fixed for a run (a resume refuses another V); every
    # dp x max(1, num_workers) you resume with must be <= V, and ideally divide it.
    virtual_streams: int = 64
    balance: bool = True              # assign micro-batches to dp ranks by estimated cost
    prefetch_factor: int = 2
    shuffle: bool = True              # reshuffle shard order and in-shard order per epoch
    max_consecutive_bad: int = 32     # more bad samples in a row than this stop the run
    max_image_pixels: int = MAX_IMAGE_PIXELS  # a larger declared image is skipped
    pack_buffer: int = 4              # open rows per task while packing (first-fit)
    pad_to_multiple_of: int = 8       # unpacked rows: pad the batch to a multiple of this
    use_manifests: bool = True        # skip shards whose manifest has no usable task

    def all_sources(self, prefix: str = "data") -> dict[str, tuple[str, SourceConfig]]:
        """name -> (config key, source): `sources`, then one source per `shards` entry
        (named shards0, shards1, ...); neither given: every .tar under `root`."""
        out = {name: (f"{prefix}.sources.{name}.shards", src)
               for name, src in self.sources.items()}
        for i, entry in enumerate(self.shards):
            key = f"{prefix}.shards[{i}]"
            name = f"shards{i}"
            if name in out:
                raise ValueError(f"{key}: its source name {name!r} is taken by "
                                 f"{prefix}.sources.{name}; rename that source")
            out[name] = (key, parse_shards_entry(entry, key))
        return out or {"all": (f"{prefix}.root", SourceConfig(ALL_SHARDS, 1.0))}

    def validate(self, prefix: str = "data") -> None:
        if not self.root:
            raise ValueError(f"{prefix}.root: must be a non-empty path")
        for name, src in self.sources.items():
            if not isinstance(src.shards, str) or not src.shards.strip():
                raise ValueError(f"{prefix}.sources.{name}.shards: a non-empty pattern")
            if not src.weight > 0:
                raise ValueError(f"{prefix}.sources.{name}.weight: must be > 0, "
                                 f"got {src.weight}")
        if self.name == "shards" and not self.shards:
            raise ValueError(f"{prefix}.shards: data=shards trains on the shards you list, e.g. "
                             f"{prefix}.shards='[/data/a/*.tar,/data/b/*.tar:0.5]'")
        self.all_sources(prefix)  # parses the `shards` entries
        for key, low in (("num_workers", 0), ("virtual_streams", 1), ("prefetch_factor", 1),
                         ("max_consecutive_bad", 0), ("max_image_pixels", 1),
                         ("pack_buffer", 1), ("pad_to_multiple_of", 1)):
            v = getattr(self, key)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{prefix}.{key}: must be an int >= {low}, got {v!r}")



def parse_shards_entry(entry: str, key: str = "data.shards[0]") -> SourceConfig:
    """`PATTERN` or `PATTERN:WEIGHT` -> a source. The text after the last `:` is the weight
    when it reads as a number (`/data/b/{000..099}.tar:0.5`) and part of the path
    otherwise (`/data/a:b/*.tar`); a path that itself ends in `:<number>` takes an
    explicit weight (`/data/x:2:1`). Several space-separated patterns make one source."""
    pattern, weight = entry, 1.0
    head, sep, tail = entry.rpartition(":")
    if sep:
        try:
            pattern, weight = head, float(tail)
        except ValueError:
            pass  # not a number: the colon belongs to the path
    if not pattern.strip():
        raise ValueError(f"{key}: {entry!r} names no shards; write PATTERN or PATTERN:WEIGHT, "
                         "e.g. '/data/mine/*.tar:0.5'")
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{key}: the weight in {entry!r} must be a number > 0")
    return SourceConfig(pattern.strip(), weight)
