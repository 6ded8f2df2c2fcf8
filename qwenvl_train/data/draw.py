"""Draw a sample's annotations on its images: boxes and quads with their labels, and the
sample's text under them -- the quickest way to see that a converter got coordinates right.

`draw_sample(sample, out_path)` takes a typed sample from `schema.py` (its `images` decoded
PIL images or encoded bytes) or a raw record dict plus `images=[...]`. Small images are
scaled up by an integer factor (coordinates with them); a box outline covers exactly the
outermost pixels of the box, so `box [x1, y1, x2, y2]` puts ink on columns x1 and x2 - 1.
`draw_shapes(images, shapes, lines, out_path)` is the drawing alone (`qwenvl-chat` draws a
model's answer with it).
"""

from __future__ import annotations

import io
import textwrap
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .records import parse_record
from .schema import Sample

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (128, 128, 0))
MIN_SIDE = 256  # images smaller than this are scaled up for legibility
PANEL_WIDTH = 96  # characters per line of the text panel
LINE_HEIGHT = 16


@lru_cache(maxsize=8)
def _font(size: int = 13) -> ImageFont.ImageFont:
    """A font with CJK glyphs when one is installed (OCR labels may be Chinese)."""
    candidates = [("pylopdf_fonts_zh_cn", "NotoSansSC-Regular.otf"),
                  ("matplotlib", "mpl-data/fonts/ttf/DejaVuSans.ttf")]
    for pkg, rel in candidates:
        spec = find_spec(pkg)
        if spec and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if path.exists():
                return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()


def _as_image(obj: Any, size: tuple[int, int]) -> Image.Image:
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, bytes | bytearray):
        with Image.open(io.BytesIO(obj)) as im:
            return im.convert("RGB")
    return Image.new("RGB", size, (128, 128, 128))  # not loaded: a placeholder


def _overlays(s: Sample) -> tuple[list[tuple[int, str, str, list]], list[str]]:
    """(image index, kind 'box'|'quad', label, coordinates) per shape, and text lines."""
    shapes: list[tuple[int, str, str, list]] = []
    lines = [f"{s.key}  task={s.task}  source={s.source}"]
    task = s.task
    if task == "caption":
        lines.append(f"caption: {s.caption}")
    elif task == "vqa":
        lines += [f"Q: {qa.question}  A: {qa.answer}" for qa in s.qa]
    elif task in ("grounding", "ref_grounding"):
        for i, r in enumerate(s.refs):
            lines.append(f"[{i}] {r.expression}")
            shapes += [(0, "box", r.expression, list(b)) for b in r.boxes]
    elif task == "grounded_caption":
        lines.append(f"caption: {s.caption}")
        for sp in s.spans:
            phrase = s.caption[sp.start : sp.end]
            shapes += [(0, "box", phrase, list(b)) for b in sp.boxes]
    elif task == "ocr":
        for r in s.regions:
            lines.append(f"text: {r.text}")
            shapes.append((0, "quad", r.text, [list(p) for p in r.quad]) if r.quad
                          else (0, "box", r.text, list(r.box)))
    elif task == "text":
        lines.append(s.text[:800])
    elif task == "chat":
        shapes, chat_lines = _chat(s)
        lines += chat_lines
    return shapes, lines


def _chat(s: Sample) -> tuple[list[tuple[int, str, str, list]], list[str]]:
    shapes: list[tuple[int, str, str, list]] = []
    lines: list[str] = []
    last_image = 0
    for m in s.messages:
        out = []
        for p in m.content:
            if p.type == "text":
                out.append(p.text)
            elif p.type == "image":
                last_image = p.image
                out.append(f"<image {p.image}>")
            else:
                label = p.ref or "box"
                out.append(f"<box {label}>")
                if p.boxes_1000:  # normalised: drawn on the latest image of the dialogue
                    w, h = s.image_sizes[last_image]
                    shapes += [(last_image, "box", label, [b[0] * w / 1000, b[1] * h / 1000,
                                                         b[2] * w / 1000, b[3] * h / 1000])
                               for b in p.boxes_1000]
                else:
                    shapes += [(p.image, "box", label, list(b)) for b in p.boxes]
        lines.append(f"{m.role}: " + " ".join(out))
    return shapes, lines


def draw_sample(sample: Sample | dict, out_path: str | Path | None = None,
                images: list[Any] | None = None, key: str = "sample") -> Image.Image:
    """Render `sample` with its boxes/quads; saved to `out_path` (PNG) when given."""
    s = parse_record(sample, key) if isinstance(sample, dict) else sample
    sources = images if images is not None else list(s.images)
    pics = [_as_image(sources[i] if i < len(sources) else None, size)
            for i, size in enumerate(s.image_sizes)]
    shapes, lines = _overlays(s)
    return draw_shapes(pics, shapes, lines, out_path)


def draw_shapes(pics: list[Image.Image], shapes: list[tuple[int, str, str, list]],
                lines: list[str], out_path: str | Path | None = None) -> Image.Image:
    """Images side by side with labelled shapes -- (image index, 'box' | 'quad', label,
    pixel coordinates of that image) -- and `lines` of text under them; saved to
    `out_path` (PNG) when given."""
    scales = [max(1, -(-MIN_SIDE // min(p.size))) for p in pics]
    pics = [p.resize((p.width * k, p.height * k), Image.Resampling.NEAREST) if k > 1
            else p.copy() for p, k in zip(pics, scales, strict=True)]
    font = _font()
    colours: dict[str, int] = {}  # one colour per label: the boxes of one phrase match
    for idx, kind, label, coords in shapes:
        if idx is None or idx >= len(pics):
            continue
        colour = PALETTE[colours.setdefault(label, len(colours)) % len(PALETTE)]
        d, k = ImageDraw.Draw(pics[idx]), scales[idx]
        if kind == "box":
            x1, y1, x2, y2 = (round(c * k) for c in coords)
            d.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=2)
            anchor = (x1, y1)
        else:
            pts = [(x * k, y * k) for x, y in coords]
            d.polygon(pts, outline=colour, width=2)
            anchor = (round(pts[0][0]), round(pts[0][1]))
        _label(d, anchor, label, colour, font)
    wrapped = [w for line in lines for w in (textwrap.wrap(line, PANEL_WIDTH) or [""])]
    width = max([sum(p.width for p in pics), 640])
    height = max([p.height for p in pics], default=0)
    canvas = Image.new("RGB", (width, height + LINE_HEIGHT * len(wrapped) + 8), "white")
    x = 0
    for p in pics:
        canvas.paste(p, (x, 0))
        x += p.width
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        d.text((4, height + 4 + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    if out_path is not None:
        canvas.save(out_path, format="PNG")
    return canvas


def _label(d: ImageDraw.ImageDraw, at: tuple[int, int], text: str, colour: tuple,
           font: ImageFont.ImageFont) -> None:
    """Label in a filled tag just above the shape (inside it at the image's top edge)."""
    text = text if len(text) <= 40 else text[:39] + "…"
    x, y = at
    left, top_, right, bottom = d.textbbox((0, 0), text, font=font)
    h = bottom - top_ + 2
    top = y - h - 2 if y - h - 2 >= 0 else y + 2
    d.rectangle((x, top, x + right - left + 3, top + h), fill=colour)
    d.text((x + 2 - left, top + 1 - top_), text, fill=(255, 255, 255), font=font)
