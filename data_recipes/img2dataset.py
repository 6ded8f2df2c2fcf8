"""img2dataset webdataset output (LAION, DataComp, CC3M/CC12M, COYO...) -> `caption`.

Input: the tars img2dataset writes with `--output_format webdataset`: per sample
`{key}.jpg` (or png/webp), `{key}.txt` (the caption) and `{key}.json` (url, caption,
status, width, height, ...). Each input tar is one unit of work; its samples are
re-sharded to `max_samples` per output shard.

Cleaning in the spirit of the paper's stage-1 filtering, each rule counted by its reason:
`too_small` (shorter side < min_side), `aspect_ratio` (long/short side > max_aspect),
`empty_caption`, `caption_too_long` (> max_chars characters), `bad_image` (the image
must decode to its last byte), `missing_member`, `broken_tar`, `download_failed` (json
status other than success).

A sample whose `.json` metadata cannot be read is kept when its `.txt` caption and image
are good -- the record needs nothing else, and img2dataset writes only successful downloads
into its tars -- and reported by key as `bad_metadata` (manifest `kept_with_problems`,
`{prefix}-problems.jsonl`, log). Without a `.txt` the caption would have come from the
metadata, so the sample is skipped as `bad_metadata`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, clean_key, image_from_bytes
from data_recipes.runner import Converter
from data_recipes.wds import BrokenTar, iter_tar_samples

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


class Img2Dataset(Converter):
    name = "img2dataset"
    task = "caption"
    source_exts = (".tar",)

    def __init__(self, src: str, source: str = "img2dataset", min_side: int = 64,
                 max_aspect: float = 3.0, min_chars: int = 1, max_chars: int = 512):
        self.src, self.source = src, source
        self.min_side, self.max_aspect = min_side, max_aspect
        self.min_chars, self.max_chars = min_chars, max_chars

    def units(self) -> Iterator[Any]:
        yield from self.source_files()

    def unit_inputs(self, unit: Any) -> list[str]:
        return [unit]

    def iter_unit(self, unit: Any) -> Iterator[Any]:
        yield from iter_tar_samples(unit)

    def item_key(self, item: Any) -> str:
        return item.path if isinstance(item, BrokenTar) else item["__key__"]

    def caption_of(self, sample: dict[str, Any], meta: dict[str, Any]) -> str:
        raw = sample.get("txt")
        text = raw.decode("utf-8", "replace") if raw is not None else meta.get("caption")
        text = " ".join(str(text or "").split())
        if len(text) < self.min_chars:
            raise Skip("empty_caption")
        if len(text) > self.max_chars:
            raise Skip("caption_too_long")
        return text

    def convert(self, item: Any) -> Converted:
        if isinstance(item, BrokenTar):
            raise Skip("broken_tar", item.error)
        ext = next((e for e in IMAGE_MEMBERS if e in item), None)
        if ext is None:
            raise Skip("missing_member")
        meta, notes = read_metadata(item)
        if notes and "txt" not in item:
            raise Skip(*notes[0])
        if meta.get("status", "success") != "success":
            raise Skip("download_failed")
        caption = self.caption_of(item, meta)  # cheap checks before the image is opened
        im = image_from_bytes(item[ext], item["__key__"])
        short, long = sorted((im.width, im.height))
        if short < self.min_side:
            raise Skip("too_small")
        if long / short > self.max_aspect:
            raise Skip("aspect_ratio")
        record = {"task": "caption", "source": self.source,
                  "images": [{"width": im.width, "height": im.height}], "caption": caption}
        return Converted(clean_key(os.path.basename(item["__key__"])), record,
                         [(im.ext, im.data)], notes)


def read_metadata(sample: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The sample's `.json` member as a dict ({} when absent), and a `bad_metadata` note
    when it is there but unreadable."""
    if "json" not in sample:
        return {}, []
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        return {}, [("bad_metadata", f"{sample['__key__']}.json: {e}")]
    if not isinstance(meta, dict):
        return {}, [("bad_metadata", f"{sample['__key__']}.json is not a JSON object")]
    return meta, []
