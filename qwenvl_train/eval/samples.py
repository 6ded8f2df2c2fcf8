"""A few evaluated items as pictures: the image with the predicted and the true boxes drawn
(`data/draw.py:draw_shapes`, the data inspector's drawing), prompt, answer and reference --
the rows of the W&B table that evaluation during training logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PIL import Image

from qwenvl_train.data.draw import draw_shapes
from qwenvl_train.data.images import open_image, to_rgb
from qwenvl_train.eval.items import Item
from qwenvl_train.eval.parse import box_to_pixels, parse_boxes

PREDICTED, TRUE = "predicted", "true"


def reference_text(task: str, row: Mapping[str, Any]) -> str:
    if task == "caption":
        return " | ".join(row["references"])
    if task == "vqa":
        return " | ".join(dict.fromkeys(row["answers"]))  # each distinct answer once
    if task == "grounding":
        return "; ".join(f"({', '.join(f'{c:g}' for c in b)})" for b in row["boxes_true"])
    return row["reference"]


def boxes(task: str, item: Item, row: Mapping[str, Any]) -> list[tuple[str, list[float]]]:
    """(label, pixel box) of the prediction and the reference, on the item's last image."""
    if task == "grounding":
        pred = [(PREDICTED, list(row["box"]))] if row["box"] is not None else []
        return pred + [(TRUE, list(b)) for b in row["boxes_true"]]
    if task == "chat" and item.images:  # boxes in [0, 1000) of the latest image
        return [(label, list(box_to_pixels(b, item.size)))
                for label, text in ((PREDICTED, row["answer"]), (TRUE, row["reference"]))
                for b in parse_boxes(text)]
    return []


def draw_item(task: str, item: Item, row: Mapping[str, Any]) -> Image.Image:
    """The item's last image (a blank panel for text-only items) with the boxes, and the
    prompt, answer and reference under it."""
    pics = [to_rgb(open_image(item.image))] if item.images else []
    shapes = [(0, "box", label, box) for label, box in boxes(task, item, row)]
    lines = [f"{task} {item.key}", f"prompt: {row.get('prompt', '')}",
             f"answer: {row['answer']}",
             f"reference: {reference_text(task, row)}"]
    return draw_shapes(pics, shapes, lines)


def table_rows(task: str, items: list[Item], rows: list[Mapping[str, Any]]
               ) -> list[dict[str, Any]]:
    """One dict per row (the first rows of `rows`, items matched by index): task, key,
    drawn image (PIL), prompt, answer, reference."""
    by_index = {it.index: it for it in items}
    out = []
    for row in rows:
        item = by_index[row["index"]]
        out.append({"task": task, "key": row["key"], "image": draw_item(task, item, row),
                    "prompt": str(row.get("prompt", "")),
                    "answer": row["answer"],
                    "reference": reference_text(task, row)})
    return out
