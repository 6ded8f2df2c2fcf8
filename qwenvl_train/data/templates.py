"""Stage templates: typed sample -> list of (segment, has_loss) pieces in Qwen-VL format.

A segment is plain text (tokenised WITHOUT special tokens, so data cannot forge markup),
a `Special` token, or an `ImageSlot` (`<img>` + N x `<imgpad>` + `</img>`). Turning pieces
into ids and labels happens in exactly one place: `encode.pieces_to_ids`.

Stage 1 (`pretrain`, caption only)::

    <img>..</img>{caption}<|endoftext|>            loss: caption + eod

Stage 2 (`multitask`, every task but chat). Prompt = no loss, answer = loss; every sample
ends with a loss-bearing `<|endoftext|>`. `<img>..</img>` opens every image task.

| task             | prompt (no loss)                                  | answer (loss)      |
|------------------|---------------------------------------------------|--------------------|
| caption          | `Describe the image in English:`                  | ` {caption}`       |
| vqa              | `{question} Answer:`                              | ` {answer}`        |
| grounding        | `<ref>{phrase}</ref>`                             | `<box>..</box>`... |
| ref_grounding    | `<ref>{expression}</ref>`                         | `<box>..</box>`... |
| grounded_caption | `Generate the caption in English with grounding:` | ` {caption*}`      |
| ocr              | `OCR with grounding:`                             | ` {regions*}`      |
| ocr (plain)      | `OCR:`                                            | ` {text}`          |
| text             | (none)                                            | `{text}` (all)     |

caption*: each grounded span becomes `<ref>{span}</ref><box>..</box>`.
regions*: `<ref>{text}</ref><quad>(x1,y1),..,(x4,y4)</quad>` per region, joined by "\n";
a region without a quad uses its `<box>`. Several QA pairs / refs of one record follow
each other, each next prompt starting with "\n".

Stage 3 (`sft`, chat only): ChatML; system "You are a helpful assistant." unless the
dialogue brings its own; images in user turns as ``Picture {n}: <img>..</img>\\n`` (n counts
across the dialogue from 1); loss on assistant content and its ``<|im_end|>`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tokenizer as tk
from .schema import (
    TASKS,
    Box,
    CaptionSample,
    ChatSample,
    GroundedCaptionSample,
    GroundingSample,
    OCRSample,
    Part,
    Point,
    RefGroundingSample,
    Sample,
    TextSample,
    VQASample,
)


@dataclass(frozen=True)
class Special:
    token: str  # e.g. "<ref>"; must be a special token of the tokenizer


@dataclass(frozen=True)
class ImageSlot:
    index: int  # image of the sample -> <img> + N x <imgpad> + </img>


Segment = str | Special | ImageSlot
Piece = tuple[Segment, bool]  # (segment, has_loss)

ACCEPTS: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"caption"}),
    "multitask": frozenset(TASKS) - {"chat"},
    "sft": frozenset({"chat"}),
}
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPTS = {
    "caption": "Describe the image in English:",
    "vqa": "{question} Answer:",
    "grounded_caption": "Generate the caption in English with grounding:",
    "ocr": "OCR with grounding:",
    "ocr_text": "OCR:",  # plain OCR (no geometry in the source)
}


def accepts(template: str, task: str) -> bool:
    """Whether `template` renders samples of `task` (decided before images are decoded)."""
    return task in ACCEPTS[template]


# ------------------------------------------------------------------ coordinates

def norm_coord(c: float, side: int) -> int:
    """Pixel coordinate -> [0, 1000) integer on the original image side (clamped)."""
    return min(max(int(c / side * 1000), 0), 999)


def box_text(box: Box, size: tuple[int, int]) -> str:
    w, h = size
    x1, y1, x2, y2 = box
    return (f"({norm_coord(x1, w)},{norm_coord(y1, h)}),"
            f"({norm_coord(x2, w)},{norm_coord(y2, h)})")


def box1000_text(box: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = (min(max(int(c), 0), 999) for c in box)
    return f"({x1},{y1}),({x2},{y2})"


def quad_text(quad: list[Point], size: tuple[int, int]) -> str:
    w, h = size
    return ",".join(f"({norm_coord(x, w)},{norm_coord(y, h)})" for x, y in quad)


def _boxes(texts: list[str]) -> list[Segment]:
    out: list[Segment] = []
    for t in texts:
        out += [Special(tk.BOX_START), t, Special(tk.BOX_END)]
    return out


def _ref(phrase: str) -> list[Segment]:
    return [Special(tk.REF_START), phrase, Special(tk.REF_END)]


def _add(pieces: list[Piece], segs: list[Segment], loss: bool) -> None:
    pieces.extend((s, loss) for s in segs if s != "")


# ------------------------------------------------------------------ stage 1 + 2

def _pretrain(s: Sample) -> list[Piece]:
    assert isinstance(s, CaptionSample)
    return [(ImageSlot(0), False), (s.caption, True), (Special(tk.ENDOFTEXT), True)]


def _multitask_answer(s: Sample, p: list[Piece]) -> None:
    size = s.image_sizes[0] if s.image_sizes else (1, 1)
    if isinstance(s, CaptionSample):
        _add(p, [PROMPTS["caption"]], False)
        _add(p, [" " + s.caption], True)
    elif isinstance(s, VQASample):
        for i, qa in enumerate(s.qa):
            _add(p, [("\n" if i else "") + PROMPTS["vqa"].format(question=qa.question)], False)
            _add(p, [" " + qa.answer], True)
    elif isinstance(s, (GroundingSample, RefGroundingSample)):
        for i, ref in enumerate(s.refs):
            _add(p, (["\n"] if i else []) + _ref(ref.expression), False)
            _add(p, _boxes([box_text(b, size) for b in ref.boxes]), True)
    elif isinstance(s, GroundedCaptionSample):
        _add(p, [PROMPTS["grounded_caption"]], False)
        segs: list[Segment] = [" "]
        pos = 0
        for sp in s.spans:
            segs += [s.caption[pos:sp.start], *_ref(s.caption[sp.start:sp.end])]
            segs += _boxes([box_text(b, size) for b in sp.boxes])
            pos = sp.end
        segs.append(s.caption[pos:])
        _add(p, _merge_text(segs), True)
    elif isinstance(s, OCRSample) and not s.regions:
        _add(p, [PROMPTS["ocr_text"]], False)
        _add(p, [" " + s.text], True)
    elif isinstance(s, OCRSample):
        _add(p, [PROMPTS["ocr"]], False)
        segs = []
        for i, r in enumerate(s.regions):
            segs += ["\n" if i else " ", *_ref(r.text)]
            if r.quad is not None:
                segs += [Special(tk.QUAD_START), quad_text(r.quad, size), Special(tk.QUAD_END)]
            else:
                segs += _boxes([box_text(r.box, size)])
        _add(p, _merge_text(segs), True)
    elif isinstance(s, TextSample):
        _add(p, [s.text], True)
    else:
        raise ValueError(f"multitask template cannot render task {s.task}")


def _multitask(s: Sample) -> list[Piece]:
    pieces: list[Piece] = [(ImageSlot(0), False)] if s.image_sizes else []
    _multitask_answer(s, pieces)
    pieces.append((Special(tk.ENDOFTEXT), True))
    return pieces


def _merge_text(segs: list[Segment]) -> list[Segment]:
    """Join adjacent plain-text segments so they tokenise as one string."""
    out: list[Segment] = []
    for s in segs:
        if isinstance(s, str) and out and isinstance(out[-1], str):
            out[-1] += s
        else:
            out.append(s)
    return out


# ------------------------------------------------------------------ stage 3 (ChatML)

def _part(part: Part, s: ChatSample, picture_no: list[int]) -> list[Segment]:
    if part.type == "text":
        return [part.text]
    if part.type == "image":
        picture_no[0] += 1
        return [f"Picture {picture_no[0]}: ", ImageSlot(part.image), "\n"]
    segs = _ref(part.ref) if part.ref is not None else []
    if part.boxes_1000:
        return segs + _boxes([box1000_text(b) for b in part.boxes_1000])
    size = s.image_sizes[part.image]
    return segs + _boxes([box_text(b, size) for b in part.boxes])


def _sft(s: Sample) -> list[Piece]:
    assert isinstance(s, ChatSample)
    pieces: list[Piece] = []
    msgs = s.messages
    if msgs[0].role != "system":
        pieces += [(Special(tk.IM_START), False), ("system\n" + SYSTEM_PROMPT, False),
                   (Special(tk.IM_END), False), ("\n", False)]
    picture_no = [0]
    for m in msgs:
        loss = m.role == "assistant"
        pieces += [(Special(tk.IM_START), False), (f"{m.role}\n", False)]
        segs: list[Segment] = []
        for part in m.content:
            segs += _part(part, s, picture_no)
        _add(pieces, _merge_text(segs), loss)
        pieces += [(Special(tk.IM_END), loss), ("\n", False)]
    return pieces


def chat_prompt(sample: ChatSample) -> list[Piece]:
    """The dialogue of `sample` as stage 3 renders it, then the opening of the next
    assistant turn (``<|im_start|>assistant\\n``): what a chat model continues."""
    return _sft(sample) + [(Special(tk.IM_START), False), ("assistant\n", False)]


RENDERERS = {"pretrain": _pretrain, "multitask": _multitask, "sft": _sft}


def render(sample: Sample, template: str) -> list[Piece]:
    """Pieces of `sample` under `template`; call `accepts` first."""
    if not accepts(template, sample.task):
        raise ValueError(f"template {template} does not take task {sample.task}")
    return RENDERERS[template](sample)
