"""Official Qwen-VL fine-tuning JSON -> `chat` samples.

Source: a JSON array of `{"id": ..., "conversations": [{"from": "user"|"assistant",
"value": ...}]}` (the format of the Qwen-VL repository's finetune script). Images are
written inline as `Picture 1: <img>path</img>\\n`; boxes as
`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` with integers in [0, 1000), possibly several
`<box>` after one `<ref>`, or a `<box>` without a `<ref>`. Image paths are relative to
`image_root`, by default the JSON file's folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from data_recipes.common import (
    Converted,
    Skip,
    clean_key,
    image_dir,
    load_image,
    records_with_root,
    resolve,
)
from data_recipes.runner import Converter

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "system": "system"}

_BOX = r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>"
_REF_BOXES = r"(?:<ref>(?P<ref>.*?)</ref>)?(?P<boxes>(?:" + _BOX + r")+)"
_TOKEN = re.compile(r"(?:Picture \d+: ?)?<img>(?P<img>.*?)</img>\n?|" + _REF_BOXES)
_REF_BOX_TOKEN = re.compile(_REF_BOXES)
_ONE_BOX = re.compile(_BOX)


def _box_1000(m: re.Match) -> list[int]:
    # The format promises [0, 1000); a few released samples say 1000: clamp them.
    return [min(999, max(0, int(v))) for v in m.groups()]


def _split(text: str, token: re.Pattern, image_paths: list[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    pos = 0

    def add_text(s: str) -> None:
        if s:
            parts.append({"type": "text", "text": s})

    for m in token.finditer(text):
        add_text(text[pos : m.start()])
        pos = m.end()
        if m.groupdict().get("img") is not None:
            image_paths.append(m.group("img").strip())
            parts.append({"type": "image", "image": len(image_paths) - 1})
        else:
            boxes = [_box_1000(b) for b in _ONE_BOX.finditer(m.group("boxes"))]
            parts.append({"type": "box", "ref": m.group("ref"), "boxes_1000": boxes})
    add_text(text[pos:])
    return parts


def parse_value(text: str, image_paths: list[str]) -> list[dict[str, Any]]:
    """Split one turn's text into content parts. Each `<img>` appends its path to
    `image_paths` (a repeated path is a new image: every image appears exactly once)."""
    return _split(text, _TOKEN, image_paths)


def ref_box_parts(text: str) -> list[dict[str, Any]]:
    """Text with Qwen-VL `<ref>..</ref><box>(x1,y1),(x2,y2)</box>` markup -> text and box
    parts (`boxes_1000`); `<img>` is left alone (for formats that mark images otherwise)."""
    return _split(text, _REF_BOX_TOKEN, [])


def conversation_to_messages(
    turns: list[dict[str, Any]], image_paths: list[str]
) -> list[dict[str, Any]]:
    messages = []
    for t in turns:
        role = ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise Skip("unknown_role", str(t.get("from")))
        value = t.get("value")
        if not isinstance(value, str):
            raise Skip("bad_turn")
        parts = parse_value(value, image_paths)
        if not parts:
            raise Skip("empty_turn")
        messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise Skip("no_assistant_turn")
    return messages


def load_images(paths: list[str], root: str) -> tuple[list[dict], list[tuple[str, bytes]]]:
    sizes, members = [], []
    for p in paths:
        im = load_image(resolve(root, p))
        sizes.append({"width": im.width, "height": im.height})
        members.append((im.ext, im.data))
    return sizes, members


class ChatJson(Converter):
    """JSON arrays (or JSON lines) of dialogue records -- one file, a folder of them or a
    glob -- whose image paths are relative to `image_root` (default: each file's folder).
    Sample keys are `{position:09d}_{id}` (the record's `id`, dots and slashes made `_`),
    so skipped items and samples are named by their source id. Subclasses parse the turns."""

    task = "chat"
    source_exts = (".json", ".jsonl")

    def __init__(self, src: str, image_root: str | None, source: str):
        self.src = src
        self.image_root = image_dir(image_root) if image_root else None
        self.source = source

    def items(self) -> Iterator[Any]:
        return records_with_root(self.source_files(), self.image_root)

    def item_key(self, item: Any) -> str:
        index, _, rec = item
        sid = rec.get("id") if isinstance(rec, dict) else None
        return f"{index:09d}_{clean_key(sid)}" if sid not in (None, "") else f"{index:09d}"

    def sample(self, item: Any, messages: list[dict], sizes: list[dict],
               members: list[tuple[str, bytes]],
               notes: list[tuple[str, str]] | None = None) -> Converted:
        record = {"task": "chat", "source": self.source, "images": sizes,
                  "messages": messages}
        return Converted(self.item_key(item), record, members, notes or [])


class QwenVLJson(ChatJson):
    name = "qwenvl_json"

    # The CLI builds its options (and their defaults) from this signature.
    def __init__(self, src: str, image_root: str | None = None, source: str = "qwenvl_sft"):
        super().__init__(src, image_root, source)

    def convert(self, item: Any) -> Converted:
        rec = item[2]
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not turns:
            raise Skip("no_conversations")
        image_paths: list[str] = []
        messages = conversation_to_messages(turns, image_paths)
        return self.sample(item, messages, *load_images(image_paths, item[1]))
