"""Evaluate a QwenVL on our shards: caption (CIDEr-D), VQA (VQAv2 accuracy), grounding
(accuracy = IoU >= 0.5 after mapping the [0, 1000) box back to original-image pixels) and
chat (exact match and token F1 of each assistant turn).

Items and prompts come from items.py (base-model prompts as in the official evaluation, or
ChatML for SFT models); `generate_rows` answers a list of items (what evaluation during
training shards over data-parallel ranks), `summarize` turns rows into the task's metrics
and `evaluate` chains them over shards. The command line is `qwenvl-eval`
(qwenvl_train/cli/eval.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qwenvl_train.data import tokenizer as tk
from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.images import load_image
from qwenvl_train.data.reader import expand_shards
from qwenvl_train.data.schema import SampleError
from qwenvl_train.eval import metrics
from qwenvl_train.eval.generate import OnlyTokenizerIds, generate, stop_ids
from qwenvl_train.eval.items import (
    Item,
    iter_items,
    prompt_pieces,
    why_empty,
)
from qwenvl_train.eval.parse import box_to_pixels, parse_boxes
from qwenvl_train.eval.tasks import (
    EVAL_TASKS,
    PROMPT_MODES,
    RECORD_TASKS,
    max_new_tokens_for,
)

__all__ = ["EVAL_TASKS", "PROMPT_MODES", "RECORD_TASKS", "Item", "evaluate", "generate_rows",
           "iter_items", "load_export", "max_new_tokens_for", "prompt_pieces",
           "resolve_shards", "summarize"]

METRICS = {"caption": ("cider_d",), "vqa": ("vqa_accuracy", "exact_match"),
           "grounding": ("grounding_accuracy", "mean_iou", "parse_rate"),
           "chat": ("exact_match", "token_f1")}


def resolve_shards(shards: str | Sequence[str], root: str | Path = ".") -> list[str]:
    """A whitespace-separated brace/glob pattern (relative to `root`, or absolute) or a list
    of paths -> shard paths."""
    if not isinstance(shards, str):
        return [str(s) for s in shards]
    base = Path("/") if shards.strip().startswith("/") else Path(root).resolve()
    return [str(base / p) for p in expand_shards(base, shards)]


def decode(item: Item, image_size: int) -> None:
    """Decode the item's images into `item.pixels` (raises SampleError for a bad one)."""
    pix = [load_image(data, image_size, expected_size=size)
           for data, size in zip(item.images, item.sizes, strict=True)]
    item.pixels = (torch.stack(pix) if pix
                   else torch.zeros(0, 3, image_size, image_size))


def _score(task: str, item: Item, text: str, mode: str) -> dict[str, Any]:
    answer = text.strip()
    if task == "vqa":
        return {"answer": answer, "answers": list(item.target),
                "vqa_accuracy": metrics.vqa_score(answer, item.target),
                "exact_match": metrics.exact_match(answer, item.extra["reference"])}
    if task == "grounding":
        # A base-mode prompt ends with `<box>`: put it back so the parser sees a whole box.
        boxes = parse_boxes((tk.BOX_START if mode == "base" else "") + text)
        pred = box_to_pixels(boxes[0], item.size) if boxes else None
        hit, best = metrics.grounding_hit(pred, item.target)
        return {"answer": answer, "box": pred, "boxes_true": [list(b) for b in item.target],
                "parsed": pred is not None, "correct": hit, "iou": best}
    if task == "chat":
        return {"answer": answer, "exact_match": metrics.exact_match(answer, item.target),
                "token_f1": metrics.token_f1(answer, item.target)}
    return {"answer": answer, "references": list(item.target)}


def summarize(task: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The task's metrics over scored rows (0.0 for no rows)."""
    n = max(1, len(rows))
    if task == "caption":
        return {"cider_d": metrics.cider_d([r["answer"] for r in rows],
                                           [r["references"] for r in rows])}
    if task == "grounding":
        return {"grounding_accuracy": sum(r["correct"] for r in rows) / n,
                "mean_iou": sum(r["iou"] for r in rows) / n,
                "parse_rate": sum(r["parsed"] for r in rows) / n}
    return {name: sum(r[name] for r in rows) / n for name in METRICS[task]}


@torch.no_grad()
def generate_rows(model, items: Iterable[Item], task: str, *, mode: str = "base",
                  tokenizer: tk.QwenVLTokenizer | None = None, batch_size: int = 8,
                  max_new_tokens: int | None = None, image_size: int | None = None,
                  skipped: dict[str, int] | None = None, **gen_kwargs) -> list[dict[str, Any]]:
    """Generate an answer to every item (batched, images decoded per batch) and score it:
    one row per item (`index`, `key`, the prompt, `output`, the task's scores and the
    reference). Items whose image does not decode are counted in `skipped`. The model is
    put in eval mode and given back in the mode it came in."""
    tok = tokenizer or tk.get_tokenizer()
    size = image_size or model.image_size
    mode = "chat" if task == "chat" else mode
    eos = stop_ids(tok, [tok.box_end_id] if task == "grounding" and mode == "base" else [])
    # A multitask VQA answer is followed by the next question on a new line.
    stops = ["\n"] if task == "vqa" and mode == "base" else []
    budget = max_new_tokens or max_new_tokens_for(task, mode)
    skipped = {} if skipped is None else skipped
    # Never the embedding's padding rows (a barely trained model may pick them).
    processors = [OnlyTokenizerIds(tok.vocab_size), *gen_kwargs.pop("logits_processor", ())]
    rows: list[dict[str, Any]] = []
    batch: list[Item] = []

    def flush() -> None:
        images = torch.cat([it.pixels for it in batch])
        prompts = [pieces_to_ids(it.prompt, tok, model.num_queries).input_ids for it in batch]
        texts = generate(model, prompts, images, tok, eos_ids=eos, stop_strings=stops,
                         max_new_tokens=budget, logits_processor=processors, **gen_kwargs)
        for it, text in zip(batch, texts, strict=True):
            rows.append({"index": it.index, "key": it.key, **it.extra, "output": text,
                         **_score(task, it, text, mode)})
            it.pixels = None
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        for item in items:
            try:  # decode here so one bad image is a skip, not a crash
                decode(item, size)
            except SampleError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    return rows


def evaluate(model, shards: str | Sequence[str], task: str, *, root: str | Path = ".",
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             image_size: int | None = None, tokenizer: tk.QwenVLTokenizer | None = None,
             return_predictions: bool = False, mode: str = "base",
             chat_prompts: Mapping[str, str] | None = None, **gen_kwargs) -> dict[str, Any]:
    """Generate on the eval items of `task` in `shards` (at most `limit`) and score them;
    returns `task`, `num_items`, `skipped` (by reason), the task's metrics, a `note` saying
    why when there are no items, and with `return_predictions` the rows (`predictions`)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task {task!r} not in {EVAL_TASKS}")
    if mode not in PROMPT_MODES:
        raise ValueError(f"mode {mode!r} not in {PROMPT_MODES}")
    paths = resolve_shards(shards, root)
    skipped: dict[str, int] = {}
    items = iter_items(paths, task, skipped, mode=mode, chat_prompts=chat_prompts)
    numbered = (_numbered(i, it) for i, it in enumerate(itertools.islice(items, limit)))
    rows = generate_rows(model, numbered, task, mode=mode, tokenizer=tokenizer,
                         batch_size=batch_size, max_new_tokens=max_new_tokens,
                         image_size=image_size, skipped=skipped, **gen_kwargs)
    out: dict[str, Any] = {"task": task, "num_items": len(rows), "skipped": skipped,
                           **summarize(task, rows)}
    if not rows:
        out["note"] = why_empty(task, paths, skipped)
    if return_predictions:
        out["predictions"] = rows
    return out


def _numbered(index: int, item: Item) -> Item:
    item.index = index
    return item


def load_export(export: str | Path, image_size: int | None = None, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """The eval-mode model of an export (either layout, or a run directory)."""
    from qwenvl_train.model.export import load_for_inference

    return load_for_inference(export, image_size=image_size, device=device, dtype=dtype)[0]
