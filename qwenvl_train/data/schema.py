"""Typed samples: one dataclass per task, the task and skip-reason names, `SampleError`.

The record format is documented in docs/contracts.md. Records become these samples in
records.py (`read_record` / `parse_record`, the single place that decides whether a record
is usable); every rejection is a `SampleError` whose `reason` is one of `REASONS`, so the
loader can count skips by cause. This module imports nothing else of the data package.
"""

from __future__ import annotations

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
    answer: str  # the training target
    # Every human answer when the source has several (VQAv2: 10); evaluation scores against
    # these (VQAv2 accuracy rule). Empty: `answer` is the only reference.
    answers: list[str] = field(default_factory=list)


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
    """Text regions with geometry, or (no regions) the image's full text: plain OCR, for
    sources that carry no line positions (e.g. stock SynthDoG)."""

    regions: list[Region] = field(default_factory=list)
    text: str = ""


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

