"""Rendered text documents (English and Chinese) with exact quads for OCR, plus plain-text
documents. Line boxes come from PIL's own layout (`ImageDraw.textbbox`); a document may be
rotated a few degrees, its quads rotated with the same affine map as the pixels."""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from data_recipes.common import Converted
from data_recipes.demo.assets import cjk_font_path, font, png

WIDTH, HEIGHT = 320, 240
MARGIN = 24  # keeps rotated corners inside the page

# Our own sentences; short enough for one line at the sizes used.
EN_LINES = (
    "The quick brown fox jumps over the lazy dog.", "Meeting moved to Friday at 10 am.",
    "Total due: 42.50 EUR", "Please keep this receipt.", "Room 214, second floor",
    "Open daily from 9 to 17", "Fresh bread every morning", "Train 8 leaves at 07:45",
    "Do not lean on the door", "Welcome to the city library", "Invoice No. 20931",
    "Call us: 555-0142", "Return by 31 March", "Shapes have colours and sizes.",
    "A red circle is round.", "Squares have four equal sides.", "Mind the gap",
    "Exit to the left", "Small steps every day", "Keep calm and read on",
    "Coffee 2.80  Tea 2.20", "Batch 7 passed all tests.", "Order #5531 shipped today",
    "Reading makes a full mind.", "Turn off the lights", "Model: QX-220",
)
ZH_LINES = (
    "今天天气很好", "欢迎来到图书馆", "请保持安静", "早上八点开门", "会议改到星期五",
    "红色的圆形", "蓝色的正方形", "绿色的三角形", "谢谢您的光临", "出口在右边",
    "火车七点出发", "请勿吸烟", "新鲜面包每天供应", "总计四十二元", "学习使人进步",
    "小心地滑", "二楼二一四号房间", "营业时间九点到五点", "请保留收据", "读书使人充实",
)


def _rotate_point(x: float, y: float, angle: float) -> list[float]:
    """Where PIL's `Image.rotate(angle)` (about the centre, counter-clockwise) moves (x, y)."""
    t = math.radians(angle)
    cx, cy = WIDTH / 2, HEIGHT / 2
    dx, dy = x - cx, y - cy
    return [round(cx + dx * math.cos(t) + dy * math.sin(t), 2),
            round(cy - dx * math.sin(t) + dy * math.cos(t), 2)]


def render_document(rng: random.Random, chinese: bool) -> tuple[Image.Image, list[dict]]:
    """A page with 3-6 lines of text; returns the image and its OCR regions (one per line)."""
    size = rng.randint(18, 24) if chinese else rng.randint(12, 18)
    f = font(size, cjk=chinese)
    bg = tuple(rng.randint(235, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    pool = ZH_LINES if chinese else EN_LINES
    im = Image.new("RGB", (WIDTH, HEIGHT), bg)
    d = ImageDraw.Draw(im)
    boxes, texts = [], []
    y = MARGIN + rng.randint(0, 12)
    for text in rng.sample(pool, rng.randint(3, 6)):
        x = MARGIN + rng.randint(0, 20)
        box = d.textbbox((x, y), text, font=f)
        if box[2] > WIDTH - MARGIN:  # too wide at this size: try the next line
            continue
        if box[3] > HEIGHT - MARGIN:
            break
        d.text((x, y), text, font=f, fill=ink)
        boxes.append(box)
        texts.append(text)
        y = box[3] + rng.randint(size // 2, size)
    angle = rng.choice((0, 0, rng.uniform(-6, 6)))
    if angle:
        im = im.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=bg)
    regions = []
    for text, (x1, y1, x2, y2) in zip(texts, boxes, strict=True):
        corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]  # clockwise from top-left
        regions.append({"text": text, "quad": [_rotate_point(px, py, angle)
                                               for px, py in corners]})
    return im, regions


def ocr_samples(n: int, seed: int = 0) -> list[Converted]:
    """`n` documents, one in three Chinese when a CJK font is installed."""
    rng = random.Random(seed)
    has_cjk = cjk_font_path() is not None
    out = []
    for i in range(n):
        chinese = has_cjk and i % 3 == 2
        im, regions = render_document(rng, chinese)
        record = {"task": "ocr", "source": "demo_docs_zh" if chinese else "demo_docs_en",
                  "images": [{"width": WIDTH, "height": HEIGHT}], "regions": regions}
        out.append(Converted(f"doc_{i:05d}", record, [("png", png(im))]))
    return out


def text_samples(n: int, seed: int = 0) -> list[Converted]:
    """Short plain-text documents: our sentences, a few facts about the demo's shapes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = rng.sample(EN_LINES, rng.randint(3, 6))
        if i % 4 == 3:
            lines = [f"{a} plus {b} is {a + b}." for a, b in
                     ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(4))]
        record = {"task": "text", "source": "demo_text", "text": " ".join(lines)}
        out.append(Converted(f"text_{i:05d}", record))
    return out
