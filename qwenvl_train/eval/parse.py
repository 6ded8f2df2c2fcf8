"""Read boxes and quads out of generated text and map them back to original-image pixels.

The encoder writes a pixel coordinate c of an image side `side` as
v = min(int(c / side * 1000), 999) (`data/templates.norm_coord`), so v only says that c
lies in the bin [v, v + 1) * side / 1000. We decode to the bin CENTRE, (v + 0.5) / 1000 *
side: the error is at most half a bin (side / 2000) and unbiased, and re-encoding the
decoded value gives v back exactly. Decoding to the bin's lower edge (v / 1000 * side)
would shift every box up-left by half a bin on average, and float rounding can re-encode
it as v - 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qwenvl_train.data.tokenizer import BOX_END, BOX_START, QUAD_END, QUAD_START, REF_END, REF_START

Box = tuple[float, float, float, float]

_PT = r"\(\s*(\d+)\s*,\s*(\d+)\s*\)"
# A box whose closing tag may be missing (generation stopped at `</box>` or max tokens).
_BOX = (re.escape(BOX_START) + r"\s*" + _PT + r"\s*,\s*" + _PT + r"\s*(?:"
        + re.escape(BOX_END) + ")?")
_QUAD = (re.escape(QUAD_START) + r"\s*" + r"\s*,\s*".join([_PT] * 4) + r"\s*(?:"
         + re.escape(QUAD_END) + ")?")
# The ref text may not span another <ref>: an unboxed ref must not swallow the next one.
_REF = (re.escape(REF_START) + f"((?:(?!{re.escape(REF_START)}|{re.escape(REF_END)}).)*)"
        + re.escape(REF_END))
_ITEM = re.compile(f"(?:{_REF})?\\s*((?:{_BOX}\\s*)+|{_QUAD})", re.S)
_PT_RE = re.compile(_PT)


@dataclass
class Grounded:
    """One `<ref>` (or none) with the boxes / quad that follow it, in [0, 1000) units."""

    ref: str | None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    quad: list[tuple[int, int]] | None = None


def parse_grounding(text: str) -> list[Grounded]:
    """All `[<ref>..</ref>]<box>(x1,y1),(x2,y2)</box>...` and `<quad>..</quad>` items."""
    out: list[Grounded] = []
    for m in _ITEM.finditer(text):
        ref, body = m.group(1), m.group(2)
        pts = [(int(x), int(y)) for x, y in _PT_RE.findall(body)]
        if body.lstrip().startswith(QUAD_START):
            out.append(Grounded(ref, quad=pts))
        else:
            out.append(Grounded(ref, boxes=[(*a, *b) for a, b in zip(pts[::2], pts[1::2],
                                                                     strict=True)]))
    return out


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every box in `text`, in order, in [0, 1000) units."""
    return [b for g in parse_grounding(text) for b in g.boxes]


def denorm_coord(v: int, side: int) -> float:
    """[0, 1000) integer -> pixel at the centre of its bin (see the module docstring)."""
    return min(max((v + 0.5) / 1000 * side, 0.0), float(side))


def box_to_pixels(box: tuple[int, int, int, int], size: tuple[int, int]) -> Box:
    """A [0, 1000) box -> pixels of the original image of (width, height) `size`."""
    w, h = size
    x1, y1, x2, y2 = box
    return denorm_coord(x1, w), denorm_coord(y1, h), denorm_coord(x2, w), denorm_coord(y2, h)


def quad_to_pixels(quad: list[tuple[int, int]], size: tuple[int, int]) -> list[tuple[float, float]]:
    w, h = size
    return [(denorm_coord(x, w), denorm_coord(y, h)) for x, y in quad]
