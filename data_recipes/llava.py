"""LLaVA instruction JSON -> `chat` samples.

Source: a JSON array (or JSON lines) of `{"id", "image": "coco/train2017/x.jpg" (or a list
of paths, or absent for text-only), "conversations": [{"from": "human"|"gpt", "value": ...}]}`.
Each `<image>` placeholder in a turn stands for the next image of `image`; a sample with
images but no placeholder gets them at the start of the first user turn.
"""

from __future__ import annotations

from typing import Any

from data_recipes.common import Converted, Skip
from data_recipes.qwenvl_json import ROLES, ChatJson

PLACEHOLDER = "<image>"


def split_placeholders(text: str, next_image: int) -> tuple[list[dict[str, Any]], int]:
    """Text parts with an image part per placeholder; the newline LLaVA writes after the
    placeholder belongs to the image and is dropped (the template renders its own)."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image", "image": next_image})
            next_image += 1
            piece = piece.lstrip("\n")
        if i < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts, next_image


class LLaVA(ChatJson):
    name = "llava"

    # The CLI builds its options (and their defaults) from this signature.
    def __init__(self, src: str, image_root: str | None = None, source: str = "llava"):
        super().__init__(src, image_root, source)

    def convert(self, item: Any) -> Converted:
        index, rec = item
        if not isinstance(rec, dict) or not rec.get("conversations"):
            raise Skip("no_conversations")
        if "video" in rec:
            raise Skip("video")
        images = rec.get("image") or []
        paths = [images] if isinstance(images, str) else list(images)
        messages, used = [], 0
        for t in rec["conversations"]:
            role = ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise Skip("unknown_role", str(t.get("from")))
            parts, used = split_placeholders(str(t.get("value", "")), used)
            if not parts:
                raise Skip("empty_turn")
            messages.append({"role": role, "content": parts})
        if used == 0 and paths:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise Skip("no_user_turn")
            first_user["content"][:0] = [{"type": "image", "image": i} for i in range(len(paths))]
            used = len(paths)
        if used != len(paths):
            raise Skip("image_count_mismatch", f"{used} placeholders, {len(paths)} images")
        if not any(m["role"] == "assistant" for m in messages):
            raise Skip("no_assistant_turn")
        return self.chat_sample(index, messages, paths)
