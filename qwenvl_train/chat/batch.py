"""`qwenvl-chat --batch FILE.jsonl`: answer many prompts without a console.

One JSON object per line, either one message::

    {"id": "q1", "images": ["a.jpg", "b.jpg"], "text": "What differs between them?"}

(`images` come first, as Picture 1, 2, ...; `<img>PATH</img>` tags in `text` work too), or a
conversation whose last message the model answers (earlier answers are taken as given)::

    {"id": "q2", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": "<img>a.jpg</img>What is this?"},
                              {"role": "assistant", "content": "A cat."},
                              {"role": "user", "content": "Where is it?"}]}

Relative image paths are relative to the JSONL file. Every line is checked (JSON, fields,
image files) before the model is loaded. Output: one JSON line per input line, in order:
`id`, `answer`, `grounding` (per `<ref>`: `boxes` in pixels of the original image and
`boxes_1000` as generated; `quad`/`quad_1000` for quads), `image` (the image the boxes
refer to: the latest of the dialogue) and `box_image` (the drawn boxes, or null).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qwenvl_train.chat.prompt import ChatError, image_tags, load_chat_image
from qwenvl_train.chat.session import ChatSession


@dataclass
class BatchItem:
    id: str
    system: str | None
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)
    text: str = ""  # the message to answer
    images: list[str] = field(default_factory=list)  # placed before `text`


def _string(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ChatError(f"{where} must be a string, got {v!r:.60}")
    return v


def _item(obj: Any, line_no: int) -> BatchItem:
    if not isinstance(obj, dict):
        raise ChatError("must be a JSON object")
    item_id = str(obj.get("id", line_no))
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ChatError("messages must be a non-empty list")
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
        contents = [_string(m.get("content") if isinstance(m, dict) else None,
                            f"messages[{i}].content") for i, m in enumerate(msgs)]
        system = None
        if roles[0] == "system":
            system, roles, contents = contents[0], roles[1:], contents[1:]
        expected = ["user", "assistant"] * (len(roles) // 2) + ["user"]
        if roles != expected:
            raise ChatError("roles must alternate user, assistant, ... and end with "
                            f"user (after an optional system first), got {roles}")
        history = list(zip(contents[:-1:2], contents[1:-1:2], strict=True))
        return BatchItem(item_id, system, history, contents[-1])
    if "text" not in obj:
        raise ChatError('needs "text" (one message) or "messages" (a conversation)')
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ChatError("images must be a list of paths")
    return BatchItem(item_id, None, [], _string(obj["text"], "text"), images)


def read_batch(path: str | Path) -> list[BatchItem]:
    """Parse and check every line (images opened) before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise ChatError(f"--batch {path}: no such file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path} line {n}: not JSON ({e})") from None
        try:
            item = _item(obj, n)
            texts = [t for pair in item.history for t in pair] + [item.text]
            for p in item.images + [p for t in texts for p in image_tags(t)]:
                load_chat_image(p, path.parent)
        except ChatError as e:
            raise ChatError(f"{path} line {n}: {e}") from None
        items.append(item)
    if not items:
        raise ChatError(f"--batch {path}: no prompts in the file")
    return items


def _safe_name(item_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", item_id).strip("._") or "item"


def run_batch(session: ChatSession, items: list[BatchItem], out: TextIO,
              base_dir: str | Path = ".", log: TextIO | None = None) -> list[dict[str, Any]]:
    """Answer every item in a fresh conversation; write one JSON line each to `out`, and a
    readable line to `log` when given."""
    rows = []
    default_system = session.system
    for item in items:
        session.system = item.system if item.system is not None else default_system
        session.reset()
        for user, assistant in item.history:
            session.add_history(user, assistant, base_dir=base_dir)
        answer = session.ask(item.text, item.images, base_dir=base_dir,
                             name=_safe_name(item.id))
        row = {"id": item.id, **answer.to_dict()}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        if log is not None:
            where = (f"box image: {answer.box_image}" if answer.box_image else
                     "no boxes in the answer" if not answer.grounding else
                     "boxes, but no image to draw them on")
            print(f"[{item.id}] {item.text}\n  -> {answer.text}\n  ({where})", file=log,
                  flush=True)
        rows.append(row)
    return rows
