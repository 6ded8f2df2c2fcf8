"""What the user types -> the prompt the model sees, in chat (ChatML) or base (stage-2) form.

A message is text in which `<img>PATH</img>` places an image (any number of them) and the
grounding tags `<ref> </ref> <box> </box> <quad> </quad>` are the model's special tokens.
Any other markup written out (`<|im_start|>`, `<imgpad>`, ...) stays plain text, so a
message cannot forge an image span or a turn boundary.

chat mode: the dialogue is rendered by the training template (`templates.render(...,
"sft")`): ChatML, the default system prompt unless one is given, images of user turns as
``Picture {n}: <img>..</img>\\n`` counted across the dialogue; the prompt ends with
``<|im_start|>assistant\\n``. Earlier answers go back in as the model wrote them (grounding
tags as special tokens).

base mode (no template: what stage 2 trained on): the message as written, each image as
`<img>..</img>` where its tag stands (no `Picture n:`, no roles, no system prompt). A later
message continues the same text after a newline -- ``{message 1}{answer 1}\\n{message 2}``
-- the way stage 2 chains several questions about one image. The paper's prompts:
``<img>a.jpg</img>Describe the image in English:``, ``<img>a.jpg</img>{question} Answer:``,
``<img>a.jpg</img><ref>{expression}</ref><box>``,
``<img>a.jpg</img>Generate the caption in English with grounding:``,
``<img>a.jpg</img>OCR with grounding:``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwenvl_train.data import tokenizer as tk
from qwenvl_train.data.images import open_image
from qwenvl_train.data.schema import ChatSample, Message, Part, SampleError
from qwenvl_train.data.templates import ImageSlot, Piece, Segment, Special, chat_prompt

MODES = ("chat", "base")
GROUNDING_TAGS = (tk.REF_START, tk.REF_END, tk.BOX_START, tk.BOX_END, tk.QUAD_START,
                  tk.QUAD_END)
_TAGS_RE = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TAGS) + ")")
_IMAGE_RE = re.compile(re.escape(tk.IMG_START) + r"(.*?)" + re.escape(tk.IMG_END), re.S)


class ChatError(ValueError):
    """A user error (bad path, bad image, bad batch line): one message, no traceback."""


@dataclass
class ChatImage:
    path: str
    data: bytes  # the encoded file
    size: tuple[int, int]  # (width, height) of the original image


@dataclass
class Turn:
    """A user message (text and indices into the conversation's images, in order) and the
    answer, once there is one."""

    parts: list[str | int]
    answer: str | None = None


@dataclass
class Conversation:
    mode: str = "chat"
    system: str | None = None  # chat mode; None = the template's default
    images: list[ChatImage] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def add_user(self, text: str, image_paths: Sequence[str] = (),
                 base_dir: str | Path = ".") -> Turn:
        """Parse a message (the images of `image_paths` first, then the text with its
        `<img>` tags) and append it. Raises ChatError, leaving the conversation unchanged,
        when an image cannot be read or the message is empty."""
        items: list[tuple[str, str]] = [("image", p) for p in image_paths]
        pos = 0
        for m in _IMAGE_RE.finditer(text):
            items += [("text", text[pos:m.start()]), ("image", m.group(1).strip())]
            pos = m.end()
        items.append(("text", text[pos:]))
        parts: list[str | int] = []
        new_images: list[ChatImage] = []
        for kind, value in items:
            if kind == "image":
                new_images.append(load_chat_image(value, base_dir))
                parts.append(len(self.images) + len(new_images) - 1)
                continue
            # The template ends an image line with "\n": drop the spaces after a tag.
            value = value.lstrip() if parts and isinstance(parts[-1], int) else value
            if value:
                parts.append(value)
        if parts and isinstance(parts[-1], str):
            parts[-1] = parts[-1].rstrip()
            parts = parts if parts[-1] else parts[:-1]
        if not parts:
            raise ChatError("empty message: type some text or an <img>PATH</img>")
        self.images += new_images
        turn = Turn(parts)
        self.turns.append(turn)
        return turn

    def latest_image(self) -> int | None:
        """The last image of the dialogue so far: the one its boxes refer to (the released
        Qwen-VL-Chat draws on the latest picture too)."""
        idx = [p for t in self.turns for p in t.parts if isinstance(p, int)]
        return idx[-1] if idx else None


def image_tags(text: str) -> list[str]:
    """The paths of the `<img>PATH</img>` tags of a message."""
    return [m.group(1).strip() for m in _IMAGE_RE.finditer(text)]


def load_chat_image(path: str, base_dir: str | Path = ".") -> ChatImage:
    full = Path(path).expanduser()
    full = full if full.is_absolute() else Path(base_dir) / full
    if not full.is_file():
        raise ChatError(f"image {path!r}: no such file ({full})")
    data = full.read_bytes()
    try:
        size = open_image(data).size
    except SampleError as e:
        raise ChatError(f"image {path!r}: {e.msg}") from None
    return ChatImage(str(full), data, size)


def grounding_segments(text: str) -> list[Segment]:
    """Text -> plain strings and the grounding tags as special tokens."""
    return [Special(s) if s in GROUNDING_TAGS else s for s in _TAGS_RE.split(text) if s]


def _with_tags(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for seg, loss in pieces:
        if isinstance(seg, str):
            out += [(s, loss) for s in grounding_segments(seg)]
        else:
            out.append((seg, loss))
    return out


def chat_pieces(conv: Conversation) -> list[Piece]:
    """The ChatML prompt for the last user turn, through the training template."""
    messages = [Message("system", [Part("text", text=conv.system)])] if conv.system else []
    for turn in conv.turns:
        messages.append(Message("user", [Part("image", image=p) if isinstance(p, int)
                                         else Part("text", text=p) for p in turn.parts]))
        if turn.answer is not None:
            messages.append(Message("assistant", [Part("text", text=turn.answer)]))
    sample = ChatSample(key="chat", source="qwenvl-chat", task="chat",
                        image_sizes=[im.size for im in conv.images], messages=messages)
    return _with_tags(chat_prompt(sample))


def base_pieces(conv: Conversation) -> list[Piece]:
    """The base-model prompt: every message and answer so far, joined by newlines."""
    segs: list[Segment] = []
    for i, turn in enumerate(conv.turns):
        if i:
            segs.append("\n")
        for p in turn.parts:
            segs += [ImageSlot(p)] if isinstance(p, int) else grounding_segments(p)
        if turn.answer is not None:
            segs += grounding_segments(turn.answer + base_closing(turn))
    return [(s, False) for s in segs]


def pieces_for(conv: Conversation) -> list[Piece]:
    return chat_pieces(conv) if conv.mode == "chat" else base_pieces(conv)


def last_text(turn: Turn) -> str:
    """The text the message ends with (empty when it ends with an image)."""
    return turn.parts[-1] if turn.parts and isinstance(turn.parts[-1], str) else ""


def base_closing(turn: Turn) -> str:
    """A base-mode grounding prompt ends with `<box>` and generation stops at `</box>`
    (not part of the answer); the tag goes back in after the answer."""
    return tk.BOX_END if last_text(turn).endswith(tk.BOX_START) else ""


def base_context(turn: Turn) -> str:
    """The prompt text a base-mode answer continues, as far as parsing its boxes needs:
    `<ref>..</ref><box>` when the message ends with `<box>`, else nothing."""
    text = last_text(turn)
    if not text.endswith(tk.BOX_START):
        return ""
    start = text.rfind(tk.REF_START)
    return text[start:] if start >= 0 else tk.BOX_START
