"""GRIT (Kosmos-2's grounded image-text pairs) -> grounded_caption / grounding / ref_grounding.

A GRIT row has `caption`, `noun_chunks` and `ref_exps`: lists of
[start, end, x1, y1, x2, y2, score], character spans of the caption with a box whose
corners are normalised to [0, 1] of the image width/height. Two input forms:

- img2dataset webdataset tars of GRIT (`{key}.jpg` + `{key}.json` with those fields) --
  download with `--resize_mode no` (or `keep_ratio`): normalised boxes survive an
  aspect-preserving resize, not a crop;
- parquet / JSON(L) rows with the fields plus the image: bytes in `image` ({"bytes": ...}
  or raw), a path in `image`/`file_name`, or `key` -> `{image_root}/{key}.jpg`.

Tasks: `grounded_caption` (caption + noun-chunk spans), `grounding` (each noun chunk's text
-> its boxes), `ref_grounding` (each referring expression of `ref_exps` -> its box).
Only grounded captions need disjoint spans (one caption, each span marked once): of
overlapping noun chunks the earliest is kept. Phrases and referring expressions are
separate prompts, so they keep every span: expressions overlap by nature ("a wire hanger
with a paper cover" contains "a wire hanger"). Paths in table rows are relative to
`image_root` (default: the table file's folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from data_recipes.common import (
    Converted,
    Skip,
    clean_key,
    clip_box,
    image_dir,
    image_from_bytes,
    row_image,
)
from data_recipes.runner import Converter
from data_recipes.wds import BrokenTar, iter_table, iter_tar_samples

TASKS = ("grounded_caption", "grounding", "ref_grounding")
_COLUMNS = ["key", "caption", "noun_chunks", "ref_exps", "image", "file_name", "url"]


def spans_from_chunks(
    chunks: Any, width: int, height: int, min_score: float, disjoint: bool
) -> list[tuple[int, int, list[list[float]]]]:
    """[(start, end, [pixel boxes])] sorted by start; chunks with one span share an entry.
    `disjoint`: of overlapping spans keep the earliest (what a grounded caption needs)."""
    spans: dict[tuple[int, int], list[list[float]]] = {}
    for c in chunks or []:
        if len(c) < 6:
            continue
        score = float(c[6]) if len(c) > 6 else 1.0
        if score < min_score:
            continue
        s, e = int(c[0]), int(c[1])
        box = clip_box([c[2] * width, c[3] * height, c[4] * width, c[5] * height],
                       width, height)
        if box is not None and e > s:
            spans.setdefault((s, e), []).append(box)
    kept: list[tuple[int, int, list[list[float]]]] = []
    for (s, e), b in sorted(spans.items()):
        if not disjoint or not kept or s >= kept[-1][1]:
            kept.append((s, e, b))
    return kept


class GRIT(Converter):
    name = "grit"
    option_choices = {"task": TASKS}
    source_exts = (".tar", ".parquet", ".jsonl", ".json")

    def __init__(self, src: str, image_root: str | None = None,
                 task: str = "grounded_caption", min_score: float = 0.0,
                 source: str = "grit"):
        if task not in TASKS:
            raise ValueError(f"task: {task!r}, expected one of {TASKS}")
        self.src, self.task = src, task
        self.image_root = image_dir(image_root) if image_root else None
        self.min_score, self.source = min_score, source

    # Tars are units of their own (read inside the worker); tables are cut into blocks.
    def units(self) -> Iterator[Any]:
        index = 0
        for path in self.source_files():
            if path.endswith(".tar"):
                yield ("tar", path)
                continue
            root = self.image_root or os.path.dirname(os.path.abspath(path))
            block: list = []
            for row in iter_table(path, _COLUMNS):
                row["__index__"] = index
                index += 1
                block.append(row)
                if len(block) == self.block_size:
                    yield ("rows", root, block)
                    block = []
            if block:
                yield ("rows", root, block)

    def unit_inputs(self, unit: Any) -> list[str]:
        # A tar stands alone; row indices (the keys of rows without one) run across tables.
        if unit[0] == "tar":
            return [unit[1]]
        return [p for p in self.inputs() if not p.endswith(".tar")]

    def iter_unit(self, unit: Any) -> Iterator[Any]:
        if unit[0] == "tar":
            yield from iter_tar_samples(unit[1])
        else:
            yield from ((unit[1], row) for row in unit[2])

    def item_key(self, item: Any) -> str:
        if isinstance(item, BrokenTar):
            return item.path
        if isinstance(item, dict):  # a webdataset sample
            return os.path.basename(item["__key__"])
        row = item[1]
        return clean_key(row.get("key") or f"row{row['__index__']:09d}")

    def convert(self, item: Any) -> Converted:
        if isinstance(item, BrokenTar):
            raise Skip("broken_tar", item.error)
        if isinstance(item, dict):  # a webdataset sample
            if "jpg" not in item or "json" not in item:
                raise Skip("missing_member")
            try:
                row = json.loads(item["json"])
            except ValueError as e:
                raise Skip("bad_json", str(e)) from e
            im = image_from_bytes(item["jpg"], item["__key__"])
            key = row.get("key") or os.path.basename(item["__key__"])
        else:
            root, row = item
            im = row_image(row, root)
            key = row.get("key") or f"row{row['__index__']:09d}"
        caption = str(row.get("caption") or "")
        if not caption.strip():
            raise Skip("empty_caption")
        field = "ref_exps" if self.task == "ref_grounding" else "noun_chunks"
        spans = spans_from_chunks(row.get(field), im.width, im.height, self.min_score,
                                  disjoint=self.task == "grounded_caption")
        spans = [(s, e, b) for s, e, b in spans if e <= len(caption)]
        if not spans:
            raise Skip("no_boxes")
        record: dict[str, Any] = {"task": self.task, "source": self.source,
                                  "images": [{"width": im.width, "height": im.height}]}
        if self.task == "grounded_caption":
            record["caption"] = caption
            record["spans"] = [{"start": s, "end": e, "boxes": b} for s, e, b in spans]
        else:
            merged: dict[str, list] = {}
            for s, e, b in spans:
                merged.setdefault(caption[s:e].strip(), []).extend(b)
            record["refs"] = [{"expression": t, "boxes": b} for t, b in merged.items() if t]
        return Converted(clean_key(key), record, [(im.ext, im.data)])
