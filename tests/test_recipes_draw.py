"""`qwenvl_train.data.draw.draw_sample`: outlines land on the box / quad coordinates."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qwenvl_train.data.draw import PALETTE, draw_sample
from qwenvl_train.data.records import parse_record

GREY = (128, 128, 128)


def _grey(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), GREY)


def _px(im: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return im.getpixel((x, y))


def test_box_outline_on_the_box_edges(tmp_path):
    rec = {"task": "ref_grounding", "source": "t", "images": [{"width": 300, "height": 300}],
           "refs": [{"expression": "the thing", "boxes": [[40, 100, 120, 220]]}]}
    out = draw_sample(rec, tmp_path / "a.png", images=[_grey(300, 300)])
    assert (tmp_path / "a.png").exists()
    red = PALETTE[0]
    for x, y in [(40, 180), (119, 180), (80, 219)]:  # left, right, bottom edges
        assert _px(out, x, y) == red
    for x, y in [(38, 180), (122, 180), (80, 160), (80, 222)]:  # just outside / inside
        assert _px(out, x, y) == GREY
    assert _px(out, 60, 95) != GREY  # the label tag sits just above the box


def test_small_images_scale_with_their_boxes():
    rec = {"task": "grounding", "source": "t", "images": [{"width": 64, "height": 64}],
           "refs": [{"expression": "a", "boxes": [[10, 20, 30, 40]]},
                    {"expression": "b", "boxes": [[40, 40, 60, 60]]}]}
    s = parse_record(rec, "k")
    s.images = [_grey(64, 64)]
    out = draw_sample(s)  # 64 px -> scaled x4 to reach 256
    assert _px(out, 40, 120) == PALETTE[0] and _px(out, 119, 120) == PALETTE[0]
    assert _px(out, 239, 200) == PALETTE[1] and _px(out, 200, 200) == GREY


def test_quads_and_chat_boxes_1000(tmp_path):
    quad = [[50, 50], [250, 70], [240, 120], [40, 100]]
    rec = {"task": "ocr", "source": "t", "images": [{"width": 300, "height": 300}],
           "regions": [{"text": "hello", "quad": quad}]}
    out = np.asarray(draw_sample(rec, images=[_grey(300, 300)]))
    # Midpoint of the right edge (250,70)-(240,120) is on the outline.
    assert tuple(out[95, 245]) == PALETTE[0] and tuple(out[150, 150]) == GREY
    chat = {"task": "chat", "source": "t", "images": [{"width": 400, "height": 300}],
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": 0},
                                             {"type": "text", "text": "Where?"}]},
                {"role": "assistant", "content": [
                    {"type": "box", "ref": "it", "boxes_1000": [[250, 500, 500, 900]]}]}]}
    out = draw_sample(chat, tmp_path / "c.png", images=[_grey(400, 300)])
    assert _px(out, 100, 200) == PALETTE[0] and _px(out, 199, 200) == PALETTE[0]
    assert _px(out, 150, 269) == PALETTE[0] and _px(out, 150, 200) == GREY
