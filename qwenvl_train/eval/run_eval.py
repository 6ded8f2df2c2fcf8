"""Evaluate a QwenVL on our shards: caption (CIDEr-D), VQA (VQAv2 accuracy), grounding
(accuracy = IoU >= 0.5 after mapping the [0, 1000) box back to original-image pixels).

Prompts are the base model's (stage-2 multitask format, as in the official evaluation):
`<img>..</img>Describe the image in English:`, `<img>..</img>{question} Answer:` and
`<img>..</img><ref>{expression}</ref><box>`. Each QA pair / referring expression of a
record is one independent eval item.

The command line is `qwenvl-eval` (qwenvl_train/cli/eval.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenvl_train.data import tokenizer as tk
from qwenvl_train.data.config import MAX_IMAGE_PIXELS
from qwenvl_train.data.encode import pieces_to_ids
from qwenvl_train.data.images import load_image
from qwenvl_train.data.reader import ShardFile, expand_shards, index_tar
from qwenvl_train.data.records import Record, read_record
from qwenvl_train.data.schema import SampleError
from qwenvl_train.data.templates import PROMPTS, ImageSlot, Piece, Special
from qwenvl_train.eval import metrics
from qwenvl_train.eval.generate import generate, stop_ids
from qwenvl_train.eval.parse import box_to_pixels, parse_boxes
from qwenvl_train.eval.tasks import EVAL_TASKS, MAX_NEW_TOKENS, RECORD_TASKS


@dataclass
class Item:
    key: str
    prompt: list[Piece]
    image: bytes
    size: tuple[int, int]  # (width, height) of the original image
    target: Any  # caption refs | VQA answers | pixel boxes
    extra: dict = field(default_factory=dict)  # reported with the prediction
    pixels: torch.Tensor | None = None  # the decoded, normalised image


def prompt_pieces(task: str, text: str) -> list[Piece]:
    """The eval prompt (no loss anywhere), reusing the stage-2 template's strings."""
    if task == "caption":
        segs: list = [PROMPTS["caption"]]
    elif task == "vqa":
        segs = [PROMPTS["vqa"].format(question=text)]
    elif task == "grounding":
        # The expression is data text (tokenised without specials), markup stays special.
        segs = [Special(tk.REF_START), text, Special(tk.REF_END), Special(tk.BOX_START)]
    else:
        raise ValueError(f"task {task!r} not in {EVAL_TASKS}")
    return [(ImageSlot(0), False), *((s, False) for s in segs)]


def _answers(raw_qa: dict, answer: str) -> list[str]:
    """All human answers when the record keeps them (`qa[i].answers`, strings or VQAv2
    `{"answer": ...}` dicts), else the single stored answer."""
    extra = raw_qa.get("answers") if isinstance(raw_qa, dict) else None
    if isinstance(extra, list) and extra:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in extra]
    return [answer]


def _items_of(task: str, record: Record) -> Iterator[Item]:
    sample, raw = record.sample, record.raw
    key, image, size = sample.key, sample.images[0], sample.image_sizes[0]
    if task == "caption":
        refs = raw.get("captions") or [sample.caption]  # extra references when present
        yield Item(key, prompt_pieces(task, ""), image, size, [str(r) for r in refs])
    elif task == "vqa":
        for i, qa in enumerate(sample.qa):
            yield Item(f"{key}#{i}", prompt_pieces(task, qa.question), image, size,
                       _answers(raw["qa"][i], qa.answer),
                       {"question": qa.question, "reference": qa.answer})
    else:
        for i, ref in enumerate(sample.refs):
            yield Item(f"{key}#{i}", prompt_pieces(task, ref.expression), image, size,
                       [tuple(b) for b in ref.boxes], {"expression": ref.expression})


def iter_items(shards: Sequence[str], task: str, counts: dict[str, int], *,
               max_image_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Item]:
    """Eval items of `task` from shard files, in shard order; records are read as the
    training loader reads them (`read_record`), skips are counted in `counts`."""
    for path in shards:
        index = index_tar(path)
        if index.error:
            counts["bad_tar"] = counts.get("bad_tar", 0) + 1
        f = ShardFile(path)
        try:
            for entry in index.entries:
                try:
                    record = read_record(entry, f, max_image_pixels=max_image_pixels,
                                         tasks=RECORD_TASKS[task])
                    if record is not None:
                        yield from _items_of(task, record)
                except (SampleError, ValueError, KeyError) as e:
                    reason = getattr(e, "reason", "bad_record")
                    counts[reason] = counts.get(reason, 0) + 1
        finally:
            f.close()


def resolve_shards(shards: str | Sequence[str], root: str | Path = ".") -> list[str]:
    """A whitespace-separated brace/glob pattern (relative to `root`, or absolute) or a list
    of paths -> shard paths."""
    if not isinstance(shards, str):
        return [str(s) for s in shards]
    base = Path("/") if shards.strip().startswith("/") else Path(root).resolve()
    return [str(base / p) for p in expand_shards(base, shards)]


def _score(task: str, item: Item, text: str) -> dict[str, Any]:
    if task == "vqa":
        answer = text.strip()
        return {"answer": answer, "vqa_accuracy": metrics.vqa_score(answer, item.target),
                "exact_match": metrics.exact_match(answer, item.extra["reference"])}
    if task == "grounding":
        # The prompt ends with `<box>`: put it back so the parser sees a whole box.
        boxes = parse_boxes(tk.BOX_START + text)
        pred = box_to_pixels(boxes[0], item.size) if boxes else None
        hit, best = metrics.grounding_hit(pred, item.target)
        return {"box": pred, "parsed": pred is not None, "correct": hit, "iou": best}
    return {"caption": text.strip()}


def _summary(task: str, rows: list[dict], targets: list[Any]) -> dict[str, float]:
    n = max(1, len(rows))
    if task == "vqa":
        return {"vqa_accuracy": sum(r["vqa_accuracy"] for r in rows) / n,
                "exact_match": sum(r["exact_match"] for r in rows) / n}
    if task == "grounding":
        return {"grounding_accuracy": sum(r["correct"] for r in rows) / n,
                "mean_iou": sum(r["iou"] for r in rows) / n,
                "parse_rate": sum(r["parsed"] for r in rows) / n}
    return {"cider_d": metrics.cider_d([r["caption"] for r in rows], targets)}


@torch.no_grad()
def evaluate(model, shards: str | Sequence[str], task: str, *, root: str | Path = ".",
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             image_size: int | None = None, tokenizer: tk.QwenVLTokenizer | None = None,
             return_predictions: bool = False, **gen_kwargs) -> dict[str, Any]:
    """Generate on every eval item of `task` in `shards` and score; returns a dict with
    `task`, `num_items`, `skipped` (by reason), the task's metrics and, when asked,
    `predictions` (one dict per item)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task {task!r} not in {EVAL_TASKS}")
    tok = tokenizer or tk.get_tokenizer()
    size = image_size or model.image_size
    eos = stop_ids(tok, [tok.box_end_id] if task == "grounding" else [])
    stops = ["\n"] if task == "vqa" else []  # multitask VQA chains the next question on "\n"
    counts: dict[str, int] = {}
    targets: list[Any] = []
    rows: list[dict] = []
    was_training = model.training
    model.eval()
    batch: list[Item] = []

    def flush() -> None:
        images = torch.stack([it.pixels for it in batch])
        prompts = [pieces_to_ids(it.prompt, tok, model.num_queries).input_ids for it in batch]
        texts = generate(model, prompts, images, tok, eos_ids=eos, stop_strings=stops,
                         max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], **gen_kwargs)
        for it, text in zip(batch, texts, strict=True):
            rows.append({"key": it.key, **it.extra, "output": text, **_score(task, it, text)})
            targets.append(it.target)
        batch.clear()

    try:
        for item in iter_items(resolve_shards(shards, root), task, counts):
            if limit is not None and len(rows) + len(batch) >= limit:
                break
            try:  # decode here so one bad image is a skip, not a crash
                item.pixels = load_image(item.image, size, expected_size=item.size)
                item.image = b""  # keep only the decoded copy
            except SampleError as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"task": task, "num_items": len(rows), "skipped": counts,
                           **_summary(task, rows, targets)}
    if return_predictions:
        out["predictions"] = rows
    return out


def load_export(export: str | Path, image_size: int, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """Build the model described by an export's `config.json` and load its weights."""
    from qwenvl_train.model.config import QwenVLConfig
    from qwenvl_train.model.qwenvl import build_model
    from qwenvl_train.model.weights import load_consolidated

    cfg = QwenVLConfig.from_dict(json.loads((Path(export) / "config.json").read_text()))
    model = build_model(cfg, image_size)
    load_consolidated(model, export)
    return model.to(device=device, dtype=dtype).eval()
