"""SynthDoG-style OCR annotations -> `ocr` samples (text regions with quads).

Donut's SynthDoG writes `metadata.jsonl` lines `{"file_name": "image_0.jpg",
"ground_truth": "<json string>"}` next to the images. The plain generator stores only the
text sequence; generators that keep geometry (and most OCR sets: ICDAR-like, SynthText
exports) add text regions. Accepted, in the record itself or inside `ground_truth` (also
under `gt_parse`):

    "lines" | "words" | "regions": [{"text": "...", "quad": [[x, y] x 4] | [x1, y1, ..., y4]
                                     | "bbox"/"box": [x1, y1, x2, y2]}]

Quads are pixels, clockwise from top-left (as the record contract says). `level` picks
lines (default) or words when both exist. Records without geometry are skipped
(`no_regions`): OCR samples teach reading *with* positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, load_image, resolve
from data_recipes.jsonstream import iter_records
from data_recipes.runner import Converter
from data_recipes.wds import expand_sources

LEVELS = ("lines", "words")


def _as_quad(q: Any) -> list[list[float]] | None:
    if isinstance(q, list) and len(q) == 8 and all(isinstance(v, int | float) for v in q):
        return [[float(q[i]), float(q[i + 1])] for i in range(0, 8, 2)]
    if isinstance(q, list) and len(q) == 4 and all(isinstance(p, list | tuple) and len(p) == 2
                                                   for p in q):
        return [[float(p[0]), float(p[1])] for p in q]
    return None


def _within(pts: list[list[float]], width: int, height: int) -> list[list[float]]:
    # Renderers put glyph edges a hair outside the canvas; clamp to the image.
    return [[round(min(max(x, 0.0), width), 2), round(min(max(y, 0.0), height), 2)]
            for x, y in pts]


def regions_of(rec: dict[str, Any], level: str, width: int, height: int) -> list[dict]:
    """The record's text regions at `level`, in the record contract's form."""
    holders = [rec]
    gt = rec.get("ground_truth")
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError as e:
            raise Skip("bad_json") from e
    if isinstance(gt, dict):
        holders += [gt, gt.get("gt_parse") or {}]
    order = [level, *(lv for lv in LEVELS if lv != level), "regions"]
    found = next((h[k] for k in order for h in holders if isinstance(h.get(k), list)), None)
    out = []
    for r in found or []:
        text = " ".join(str(r.get("text") or "").split()) if isinstance(r, dict) else ""
        if not text:
            continue
        region: dict[str, Any] = {"text": text}
        quad = _as_quad(r.get("quad") or r.get("points"))
        box = r.get("bbox") or r.get("box")
        if quad is not None:
            region["quad"] = _within(quad, width, height)
        elif isinstance(box, list) and len(box) == 4:
            (x1, y1), (x2, y2) = _within([box[:2], box[2:]], width, height)
            if x2 <= x1 or y2 <= y1:
                continue
            region["box"] = [x1, y1, x2, y2]
        else:
            continue
        out.append(region)
    return out


class SynthDoG(Converter):
    name = "synthdog"
    task = "ocr"
    option_choices = {"level": LEVELS}

    def __init__(self, src: str, image_root: str | None = None, level: str = "lines",
                 source: str = "synthdog"):
        if level not in LEVELS:
            raise ValueError(f"level: {level!r}, expected one of {LEVELS}")
        self.src, self.image_root, self.level, self.source = src, image_root, level, source

    def items(self) -> Iterator[Any]:
        index = 0
        for path in expand_sources(self.src, (".jsonl", ".json")):
            root = self.image_root or os.path.dirname(os.path.abspath(path))
            for rec in iter_records(path):
                yield index, root, rec
                index += 1

    def convert(self, item: Any) -> Converted:
        index, root, rec = item
        name = (rec.get("file_name") or rec.get("image")) if isinstance(rec, dict) else None
        if not isinstance(name, str):
            raise Skip("no_image")
        im = load_image(resolve(root, name))
        regions = regions_of(rec, self.level, im.width, im.height)
        if not regions:
            raise Skip("no_regions")
        record = {"task": "ocr", "source": self.source,
                  "images": [{"width": im.width, "height": im.height}], "regions": regions}
        return Converted(f"{index:09d}", record, [(im.ext, im.data)])
