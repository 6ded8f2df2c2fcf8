"""LLaVA instruction JSON -> `chat` samples.

Source: a JSON array (or JSON lines) of `{"id", "image": "coco/train2017/x.jpg" (or a list
of paths, or absent for text-only), "conversations": [{"from": "human"|"gpt", "value": ...}]}`.
Each `<image>` placeholder in a turn stands for the next image of `image`; a sample with
images but no placeholder gets them at the start of the first user turn.

Boxes written inside the text become box parts of the record, so the templates render them
as `<box>` tokens instead of the model learning digits in brackets:

- Qwen-VL markup `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` (integers in [0, 1000)),
  always;
- LLaVA-1.5's normalised lists `[x0, y0, x1, y1]` (numbers in [0, 1]) with `list_boxes`:
  `image` when they are fractions of the image's width/height, `padded` when they are
  fractions of the image padded to a square (LLaVA-1.5's `expand2square`, centred).
  Off by default: plain text can hold such a list. Only in single-image samples (a list
  does not say which image it is on; in multi-image samples it stays text, and the sample
  is reported).
"""

from __future__ import annotations

import re
from typing import Any

from data_recipes.common import Converted, Skip, clip_box
from data_recipes.qwenvl_json import ROLES, ChatJson, load_images, ref_box_parts

PLACEHOLDER = "<image>"
LIST_BOXES = ("off", "image", "padded")
_UNIT = r"\s*(0(?:\.\d+)?|1(?:\.0+)?|\.\d+)\s*"  # a number in [0, 1]
_LIST_BOX = re.compile(r"\[" + ",".join([_UNIT] * 4) + r"\]")


def split_placeholders(text: str, next_image: int) -> tuple[list[dict[str, Any]], int]:
    """Text parts with an image part per placeholder. The newline LLaVA writes after the
    placeholder belongs to the image and is dropped (the template renders its own after
    `Picture n: <img>..</img>`); text before a placeholder keeps its newline."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image", "image": next_image})
            next_image += 1
            piece = piece.lstrip("\n")
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts, next_image


def list_box_pixels(values: list[float], size: tuple[int, int],
                    convention: str) -> list[float] | None:
    """A normalised [x0, y0, x1, y1] -> pixel box of the image (None when nothing of it
    lies on the image). `padded`: fractions of the square the image was centred in."""
    w, h = size
    if convention == "padded":
        side = max(w, h)
        dx, dy = (side - w) // 2, (side - h) // 2  # expand2square pastes at these offsets
        box = [values[0] * side - dx, values[1] * side - dy,
               values[2] * side - dx, values[3] * side - dy]
    else:
        box = [values[0] * w, values[1] * h, values[2] * w, values[3] * h]
    return clip_box(box, w, h)


def list_box_parts(text: str, size: tuple[int, int], convention: str) -> list[dict[str, Any]]:
    """Text -> text parts and pixel box parts (on image 0) for every normalised list that
    is a box (x0 < x1, y0 < y1); other lists stay text."""
    parts: list[dict[str, Any]] = []
    pos = 0
    for m in _LIST_BOX.finditer(text):
        values = [float(v) for v in m.groups()]
        if not (values[0] < values[2] and values[1] < values[3]):
            continue
        box = list_box_pixels(values, size, convention)
        if box is None:
            raise Skip("box_outside_image", f"{m.group(0)} is outside the "
                                            f"{size[0]}x{size[1]} image ({convention})")
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos : m.start()]})
        parts.append({"type": "box", "ref": None, "image": 0, "boxes": [box]})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


class LLaVA(ChatJson):
    name = "llava"
    option_choices = {"list_boxes": LIST_BOXES}

    # The CLI builds its options (and their defaults) from this signature.
    def __init__(self, src: str, image_root: str | None = None, list_boxes: str = "off",
                 source: str = "llava"):
        if list_boxes not in LIST_BOXES:
            raise ValueError(f"list_boxes: {list_boxes!r}, expected one of {LIST_BOXES}")
        super().__init__(src, image_root, source)
        self.list_boxes = list_boxes

    def _messages(self, rec: dict[str, Any], n_images: int) -> list[dict[str, Any]]:
        """The turns as messages of text and image parts (no file is read here)."""
        messages, used = [], 0
        for t in rec["conversations"]:
            role = ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise Skip("unknown_role", str(t.get("from")))
            parts, used = split_placeholders(str(t.get("value", "")), used)
            if not parts:
                raise Skip("empty_turn")
            messages.append({"role": role, "content": parts})
        if used == 0 and n_images:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise Skip("no_user_turn")
            first_user["content"][:0] = [{"type": "image", "image": i} for i in range(n_images)]
            used = n_images
        if used != n_images:
            raise Skip("image_count_mismatch", f"{used} placeholders, {n_images} images")
        if not any(m["role"] == "assistant" for m in messages):
            raise Skip("no_assistant_turn")
        return messages

    def _boxes(self, parts: list[dict[str, Any]], sizes: list[dict],
               notes: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Text parts with their written boxes turned into box parts."""
        out: list[dict[str, Any]] = []
        for part in parts:
            if part["type"] != "text":
                out.append(part)
                continue
            for p in ref_box_parts(part["text"]):
                if p["type"] != "text" or self.list_boxes == "off":
                    out.append(p)
                elif len(sizes) == 1:
                    size = (sizes[0]["width"], sizes[0]["height"])
                    out += list_box_parts(p["text"], size, self.list_boxes)
                else:
                    if _LIST_BOX.search(p["text"]):
                        notes.append(("list_box_kept_as_text",
                                      f"{len(sizes)} images: a list box names no image"))
                    out.append(p)
        return out

    def convert(self, item: Any) -> Converted:
        rec = item[2]
        if not isinstance(rec, dict) or not rec.get("conversations"):
            raise Skip("no_conversations")
        if "video" in rec:
            raise Skip("video")
        images = rec.get("image") or []
        paths = [images] if isinstance(images, str) else list(images)
        messages = self._messages(rec, len(paths))
        sizes, members = load_images(paths, item[1])
        notes: list[tuple[str, str]] = []
        for m in messages:
            m["content"] = self._boxes(m["content"], sizes, notes)
        return self.sample(item, messages, sizes, members, notes)
