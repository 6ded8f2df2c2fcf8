"""SynthDoG-style OCR annotations -> `ocr` samples.

Donut's SynthDoG writes `metadata.jsonl` lines `{"file_name": "image_0.jpg",
"ground_truth": "<json string>"}` next to the images. Two kinds of records:

- **with geometry** (generators that keep it; most OCR sets: ICDAR-like, SynthText
  exports), in the record itself or inside `ground_truth` (also under `gt_parse`):

      "lines" | "words" | "regions": [{"text": "...", "quad": [[x, y] x 4] | [x1, y1, ..., y4]
                                       | "bbox"/"box": [x1, y1, x2, y2]}]

  -> regions with quads (pixels, clockwise from top-left, as the record contract says) or
  boxes; `level` picks lines (default) or words when both exist. The template renders
  them as `OCR with grounding:`.
- **text only**: the stock generator's `{"gt_parse": {"text_sequence": "..."}}` -> plain
  OCR, image -> the full text in reading order, no positions: the record
  `{"task": "ocr", "text": "...", "images": [...]}` (no `regions`), rendered as `OCR:`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, image_dir, load_image, records_with_root, resolve
from data_recipes.runner import Converter

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


def _ground_truth_holders(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The record and, when present, its decoded `ground_truth` and `gt_parse` objects."""
    holders = [rec]
    gt = rec.get("ground_truth")
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError as e:
            raise Skip("bad_json", str(e)) from e
    if isinstance(gt, dict):
        holders += [gt, gt.get("gt_parse") or {}]
    return holders


def regions_of(rec: dict[str, Any], level: str, width: int, height: int) -> list[dict]:
    """The record's text regions at `level`, in the record contract's form."""
    holders = _ground_truth_holders(rec)
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


def text_sequence_of(rec: dict[str, Any]) -> str:
    """The full text of a text-only record (`text_sequence`), whitespace tidied within each
    line, line breaks kept (they are reading order); "" when there is none."""
    holders = _ground_truth_holders(rec)
    raw = next((h["text_sequence"] for h in holders if isinstance(h.get("text_sequence"), str)),
               "")
    lines = (" ".join(line.split()) for line in raw.splitlines())
    return "\n".join(line for line in lines if line)


def plain_ocr_record(source: str, width: int, height: int, text: str) -> dict[str, Any]:
    """The record of an OCR sample without geometry: image -> its full text."""
    return {"task": "ocr", "source": source, "images": [{"width": width, "height": height}],
            "text": text}


class SynthDoG(Converter):
    name = "synthdog"
    task = "ocr"
    option_choices = {"level": LEVELS}
    source_exts = (".jsonl", ".json")

    def __init__(self, src: str, image_root: str | None = None, level: str = "lines",
                 source: str = "synthdog"):
        if level not in LEVELS:
            raise ValueError(f"level: {level!r}, expected one of {LEVELS}")
        self.src, self.level, self.source = src, level, source
        self.image_root = image_dir(image_root) if image_root else None

    def items(self) -> Iterator[Any]:
        return records_with_root(self.source_files(), self.image_root)

    def item_key(self, item: Any) -> str:
        return f"{item[0]:09d}"

    def convert(self, item: Any) -> Converted:
        _, root, rec = item
        name = (rec.get("file_name") or rec.get("image")) if isinstance(rec, dict) else None
        if not isinstance(name, str):
            raise Skip("no_image")
        im = load_image(resolve(root, name))
        members = [(im.ext, im.data)]
        regions = regions_of(rec, self.level, im.width, im.height)
        if regions:
            record = {"task": "ocr", "source": self.source,
                      "images": [{"width": im.width, "height": im.height}], "regions": regions}
            return Converted(self.item_key(item), record, members)
        text = text_sequence_of(rec)
        if not text:
            raise Skip("no_regions", "no text region with a position and no text_sequence")
        record = plain_ocr_record(self.source, im.width, im.height, text)
        return Converted(self.item_key(item), record, members)
