"""`DataConfig`: the `data` Hydra group (an OmegaConf structured schema)."""

from __future__ import annotations

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

    def validate(self, prefix: str = "data") -> None:
        if not self.root:
            raise ValueError(f"{prefix}.root: must be a non-empty path")
        for name, src in self.sources.items():
            if not isinstance(src.shards, str) or not src.shards.strip():
                raise ValueError(f"{prefix}.sources.{name}.shards: a non-empty pattern")
            if not src.weight > 0:
                raise ValueError(f"{prefix}.sources.{name}.weight: must be > 0, "
                                 f"got {src.weight}")
        for key, low in (("num_workers", 0), ("virtual_streams", 1), ("prefetch_factor", 1),
                         ("max_consecutive_bad", 0), ("max_image_pixels", 1),
                         ("pack_buffer", 1), ("pad_to_multiple_of", 1)):
            v = getattr(self, key)
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{prefix}.{key}: must be an int >= {low}, got {v!r}")

