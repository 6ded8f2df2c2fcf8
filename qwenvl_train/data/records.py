"""Shard records -> typed samples: the one way every reader of our shards takes.

`read_record` turns one tar entry (its JSON member and image members) into a `Record`: the
validated typed sample with its image bytes, plus the raw JSON. The training stream,
`qwenvl-data inspect` and evaluation all read through it, so they drop the same records
for the same reasons (`schema.REASONS`). `parse_record` is the validation itself (the
shard writer uses it too): every problem raises `SampleError` with a reason code, and the
message names the offending field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .reader import Entry, ShardFile
from .schema import (
    BOX_TOLERANCE_PX,
    ONE_IMAGE_TASKS,
    QA,
    ROLES,
    SAMPLE_CLASSES,
    TASKS,
    Box,
    Message,
    Part,
    Point,
    Ref,
    Region,
    Sample,
    SampleError,
    Span,
)


@dataclass
class Record:
    sample: Sample  # validated; `sample.images` holds the encoded image bytes, in index order
    raw: dict  # the JSON as stored (fields beyond the schema, e.g. extra eval references)


def _json(data: dict | bytes | str, key: str) -> Any:
    if isinstance(data, dict):
        return data
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", f"{key}: {e}") from None


def parse_record(
    record: dict | bytes | str,
    key: str,
    image_indices: set[int] | None = None,
    max_image_pixels: int | None = None,
) -> Sample:
    """Validate a shard record and return its typed sample (images not loaded).

    `image_indices`: indices of the image members present for this key; when given, a
    declared image without a member is `missing_image`. `max_image_pixels`: a declared
    image larger than this is `image_too_large`.
    """
    record = _json(record, key)
    if not isinstance(record, dict):
        raise SampleError("bad_json", f"{key}: record is not a JSON object")
    if not key or "." in key:
        raise bad(f"key {key!r} must be non-empty and contain no dots")
    task = record.get("task")
    if task not in TASKS:
        raise bad(f"task {task!r} not in {TASKS}")
    source = string(record.get("source"), "source")
    sizes = image_sizes(record, max_image_pixels)
    if task in ONE_IMAGE_TASKS and len(sizes) != 1:
        raise bad(f"task {task} needs exactly one image, record declares {len(sizes)}")
    if task == "text" and sizes:
        raise bad("task text takes no images")
    if image_indices is not None:
        missing = [i for i in range(len(sizes)) if i not in image_indices]
        if missing:
            raise SampleError("missing_image", f"{key}: no member for image(s) {missing}")
    fields = parse_fields(task, record, sizes)
    cls = SAMPLE_CLASSES[task]
    return cls(key=key, source=source, task=task, image_sizes=sizes,
               images=[None] * len(sizes), **fields)


def read_record(entry: Entry, shard: ShardFile, *, max_image_pixels: int | None,
                tasks: Collection[str] | None = None) -> Record | None:
    """One tar entry -> its validated record with the image bytes read.

    None when the record's task is valid but not in `tasks`: decided from the JSON alone,
    before anything else is validated or read. Raises `SampleError` (an unreadable member
    is `bad_tar`).
    """
    try:
        if "json" not in entry.members:
            raise SampleError("bad_record", "no .json member")
        raw = _json(shard.read(entry.members["json"]), entry.key)
        task = raw.get("task") if isinstance(raw, dict) else None
        if tasks is not None and task in TASKS and task not in tasks:
            return None
        members = entry.image_members()
        sample = parse_record(raw, entry.key, set(members), max_image_pixels)
        sample.images = [shard.read(members[i]) for i in range(len(sample.image_sizes))]
    except OSError as e:
        raise SampleError("bad_tar", str(e)) from None
    return Record(sample, raw)


# ---------------------------------------------------------------- validation helpers

def bad(msg: str) -> SampleError:
    return SampleError("bad_record", msg)


def string(v: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise bad(f"{what} must be a non-empty string, got {v!r:.60}")
    return v


def _list(v: Any, what: str, allow_empty: bool = False) -> list:
    if not isinstance(v, list) or (not allow_empty and not v):
        raise bad(f"{what} must be a non-empty list")
    return v


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{what} must be a finite number, got {v!r:.40}")
    return float(v)


def _box(v: Any, size: tuple[int, int], what: str) -> Box:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise bad(f"{what} must be [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (_num(c, what) for c in v)
    if x1 > x2 or y1 > y2:
        raise bad(f"{what} {v} is not top-left then bottom-right")
    w, h = size
    t = BOX_TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
        raise SampleError("box_outside_image", f"{what} {v} outside image {w}x{h}")
    return (x1, y1, x2, y2)


def _boxes(v: Any, size: tuple[int, int], what: str) -> list[Box]:
    return [_box(b, size, f"{what}[{i}]") for i, b in enumerate(_list(v, what))]


def _quad(v: Any, size: tuple[int, int], what: str) -> list[Point]:
    if not isinstance(v, list) or len(v) != 4:
        raise bad(f"{what} must be 4 points")
    pts = []
    w, h = size
    t = BOX_TOLERANCE_PX
    for p in v:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise bad(f"{what} point must be [x, y]")
        x, y = _num(p[0], what), _num(p[1], what)
        if not (-t <= x <= w + t and -t <= y <= h + t):
            raise SampleError("box_outside_image", f"{what} {v} outside image {w}x{h}")
        pts.append((x, y))
    return pts


def image_sizes(rec: dict, max_pixels: int | None) -> list[tuple[int, int]]:
    sizes = []
    for i, im in enumerate(_list(rec.get("images", []), "images", allow_empty=True)):
        if not isinstance(im, dict):
            raise bad(f"images[{i}] must be an object with width/height")
        w, h = im.get("width"), im.get("height")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (w, h)):
            raise bad(f"images[{i}] needs positive int width/height, got {w!r}x{h!r}")
        if max_pixels and w * h > max_pixels:
            raise SampleError("image_too_large", f"images[{i}] is {w}x{h} > {max_pixels} px")
        sizes.append((w, h))
    return sizes


# ---------------------------------------------------------------- per-task parsers

def _refs(rec: dict, size: tuple[int, int]) -> list[Ref]:
    refs = []
    for i, r in enumerate(_list(rec.get("refs"), "refs")):
        if not isinstance(r, dict):
            raise bad(f"refs[{i}] must be an object")
        expr = string(r.get("expression"), f"refs[{i}].expression")
        refs.append(Ref(expr, _boxes(r.get("boxes"), size, f"refs[{i}].boxes")))
    return refs


def parse_fields(task: str, rec: dict, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    size = sizes[0] if sizes else (0, 0)
    if task == "caption":
        return {"caption": string(rec.get("caption"), "caption")}
    if task == "vqa":
        qa = []
        for i, p in enumerate(_list(rec.get("qa"), "qa")):
            if not isinstance(p, dict):
                raise bad(f"qa[{i}] must be an object")
            answers = p.get("answers", [])
            if not isinstance(answers, list):
                raise bad(f"qa[{i}].answers must be a list of strings")
            qa.append(QA(string(p.get("question"), f"qa[{i}].question"),
                         string(p.get("answer"), f"qa[{i}].answer"),
                         [string(a, f"qa[{i}].answers[{j}]") for j, a in enumerate(answers)]))
        return {"qa": qa}
    if task in ("grounding", "ref_grounding"):
        return {"refs": _refs(rec, size)}
    if task == "grounded_caption":
        cap = string(rec.get("caption"), "caption")
        spans = []
        for i, s in enumerate(_list(rec.get("spans"), "spans")):
            st, en = (s.get("start"), s.get("end")) if isinstance(s, dict) else (None, None)
            if not (isinstance(st, int) and isinstance(en, int) and 0 <= st < en <= len(cap)):
                raise bad(f"spans[{i}] needs 0 <= start < end <= len(caption)")
            spans.append(Span(st, en, _boxes(s.get("boxes"), size, f"spans[{i}].boxes")))
        spans.sort(key=lambda s: s.start)
        for a, b in zip(spans, spans[1:], strict=False):
            if b.start < a.end:
                raise bad("spans overlap")
        return {"caption": cap, "spans": spans}
    if task == "ocr":
        if "regions" not in rec:  # plain OCR: image -> its full text
            return {"text": string(rec.get("text"), "text (an ocr record without regions)")}
        if "text" in rec:
            raise bad("an ocr record has regions or a full text, not both")
        regions = []
        for i, r in enumerate(_list(rec.get("regions"), "regions")):
            if not isinstance(r, dict):
                raise bad(f"regions[{i}] must be an object")
            text = string(r.get("text"), f"regions[{i}].text")
            quad = _quad(r["quad"], size, f"regions[{i}].quad") if r.get("quad") else None
            box = _box(r["box"], size, f"regions[{i}].box") if r.get("box") else None
            if quad is None and box is None:
                raise bad(f"regions[{i}] needs a quad or a box")
            regions.append(Region(text, quad, box))
        return {"regions": regions}
    if task == "text":
        return {"text": string(rec.get("text"), "text")}
    return {"messages": _messages(rec, sizes)}


def _messages(rec: dict, sizes: list[tuple[int, int]]) -> list[Message]:
    msgs: list[Message] = []
    seen_images: list[int] = []
    for i, m in enumerate(_list(rec.get("messages"), "messages")):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {ROLES}")
        role = m["role"]
        if role == "system" and i != 0:
            raise bad("a system message may only come first")
        parts = []
        for j, p in enumerate(_list(m.get("content"), f"messages[{i}].content")):
            where = f"messages[{i}].content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts.append(Part("text", text=string(p.get("text"), where, allow_empty=True)))
            elif kind == "image":
                idx = p.get("image")
                if not isinstance(idx, int) or not 0 <= idx < len(sizes):
                    raise bad(f"{where}.image must index images (0..{len(sizes) - 1})")
                if role != "user":
                    raise bad(f"{where}: images may only appear in user turns")
                seen_images.append(idx)
                parts.append(Part("image", image=idx))
            elif kind == "box":
                ref = p.get("ref")
                if ref is not None:
                    string(ref, f"{where}.ref")
                if "boxes_1000" in p:
                    b1000 = []
                    for b in _list(p["boxes_1000"], f"{where}.boxes_1000"):
                        ok = isinstance(b, list) and len(b) == 4 and all(
                            isinstance(c, int) and 0 <= c < 1000 for c in b)
                        if not ok:
                            raise bad(f"{where}.boxes_1000 entries are 4 ints in [0, 1000)")
                        b1000.append(tuple(b))
                    parts.append(Part("box", ref=ref, boxes_1000=b1000))
                else:
                    idx = p.get("image")
                    if not isinstance(idx, int) or not 0 <= idx < len(sizes):
                        raise bad(f"{where}.image must index images for pixel boxes")
                    boxes = _boxes(p.get("boxes"), sizes[idx], f"{where}.boxes")
                    parts.append(Part("box", image=idx, ref=ref, boxes=boxes))
            else:
                raise bad(f"{where}.type must be text | image | box")
        msgs.append(Message(role, parts))
    if not any(m.role == "assistant" for m in msgs):
        raise bad("a dialogue needs at least one assistant turn")
    if sorted(seen_images) != list(range(len(sizes))):
        raise bad("every image must appear exactly once in the dialogue")
    return msgs


