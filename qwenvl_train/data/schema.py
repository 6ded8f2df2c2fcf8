"""Typed samples: one dataclass per task, parsed and validated from a shard's JSON record.

The record format is documented in docs/contracts.md. `parse_record` is the single place
that decides whether a record is usable; every rejection is a `SampleError` whose `reason`
is one of `REASONS`, so the loader can count skips by cause.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TASKS: tuple[str, ...] = (
    "caption", "vqa", "grounding", "ref_grounding", "grounded_caption", "ocr", "text", "chat",
)
TASK_INDEX: dict[str, int] = {t: i for i, t in enumerate(TASKS)}
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Why a sample was skipped. `too_long` is decided by the encoder, `bad_tar` by the reader.
REASONS: tuple[str, ...] = (
    "bad_json", "bad_record", "missing_image", "bad_image", "image_too_large",
    "box_outside_image", "too_long", "bad_tar",
)
# Boxes may overshoot the border by this many pixels (rounding in converters); they are
# clamped when rendered.
BOX_TOLERANCE_PX = 1.0


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, msg: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {msg}")
        self.reason = reason
        self.msg = msg


Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass
class Sample:
    key: str
    source: str
    task: str
    image_sizes: list[tuple[int, int]]  # (width, height) of the ORIGINAL images
    # Encoded image bytes (or decoded PIL images / tensors later); None = not loaded yet.
    images: list[Any] = field(default_factory=list)


@dataclass
class CaptionSample(Sample):
    caption: str = ""


@dataclass
class QA:
    question: str
    answer: str


@dataclass
class VQASample(Sample):
    qa: list[QA] = field(default_factory=list)


@dataclass
class Ref:
    expression: str
    boxes: list[Box]


@dataclass
class GroundingSample(Sample):
    """Phrase -> boxes (GRIT-style region descriptions)."""

    refs: list[Ref] = field(default_factory=list)


@dataclass
class RefGroundingSample(Sample):
    """Referring expression -> box(es)."""

    refs: list[Ref] = field(default_factory=list)


@dataclass
class Span:
    start: int
    end: int
    boxes: list[Box]


@dataclass
class GroundedCaptionSample(Sample):
    caption: str = ""
    spans: list[Span] = field(default_factory=list)


@dataclass
class Region:
    text: str
    quad: list[Point] | None = None
    box: Box | None = None


@dataclass
class OCRSample(Sample):
    regions: list[Region] = field(default_factory=list)


@dataclass
class TextSample(Sample):
    text: str = ""


@dataclass
class Part:
    """One piece of a chat turn: type text | image | box."""

    type: str
    text: str = ""
    image: int | None = None
    ref: str | None = None
    boxes: list[Box] = field(default_factory=list)  # pixels of `image`
    boxes_1000: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Message:
    role: str
    content: list[Part]


@dataclass
class ChatSample(Sample):
    messages: list[Message] = field(default_factory=list)


SAMPLE_CLASSES: dict[str, type[Sample]] = {
    "caption": CaptionSample, "vqa": VQASample, "grounding": GroundingSample,
    "ref_grounding": RefGroundingSample, "grounded_caption": GroundedCaptionSample,
    "ocr": OCRSample, "text": TextSample, "chat": ChatSample,
}
# Tasks whose record must carry exactly one image (all but text and chat).
ONE_IMAGE_TASKS = frozenset(TASKS) - {"text", "chat"}


def parse_record(
    record: dict | bytes | str,
    key: str,
    image_indices: set[int] | None = None,
    max_image_pixels: int | None = None,
) -> Sample:
    """Validate a shard record and return its typed sample (images not loaded).

    `image_indices`: indices of the image members present for this key; when given, a
    declared image without a member is `missing_image`.
    """
    from .validate import bad, image_sizes, parse_fields, string  # needs the classes above

    if isinstance(record, (bytes, str)):
        try:
            record = json.loads(record)
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleError("bad_json", f"{key}: {e}") from None
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
