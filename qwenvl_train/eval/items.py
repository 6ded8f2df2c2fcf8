"""Shard records -> evaluation items: one prompt, the images it shows, and its reference.

Eval tasks, the record tasks they read (`RECORD_TASKS`), and one item per:

| eval task | records | one item per | scored by |
|---|---|---|---|
| caption | caption | record | CIDEr-D (all the record's `captions` as references) |
| vqa | vqa | QA pair | VQAv2 accuracy (against `qa[i].answers`), exact match |
| grounding | grounding, ref_grounding | expression | accuracy at IoU >= 0.5 |
| chat | chat | assistant turn | exact match, token F1 |

Prompts, base mode / chat mode: caption `Describe the image in English:` / `Describe this
image.`; vqa `{question} Answer:` / `{question}`; grounding `<ref>{expression}</ref><box>` /
`Where is {expression}?`; chat: the dialogue up to the turn, ChatML.

Base mode is the paper's evaluation of base (stage 1-2) models: the stage-2 template's strings,
no roles. Chat mode (SFT models) asks the same thing as one ChatML user turn through the
stage-3 template (`templates.chat_prompt`); its wording is configurable (`chat_prompts`).
A chat record gives one item per assistant turn: the dialogue before it (earlier assistant
turns as the record has them) is the prompt, the turn's content as stage 3 renders it
(grounding tags included) the reference.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from qwenvl_train.data import tokenizer as tk
from qwenvl_train.data.config import MAX_IMAGE_PIXELS
from qwenvl_train.data.reader import ShardFile, index_tar
from qwenvl_train.data.records import Record, read_record
from qwenvl_train.data.schema import ChatSample, Message, Part, SampleError
from qwenvl_train.data.templates import PROMPTS, ImageSlot, Piece, Special, chat_prompt, render
from qwenvl_train.eval.tasks import EVAL_TASKS, RECORD_TASKS

T = TypeVar("T")
# The user's words in chat mode (the demo dialogues ask this way).
CHAT_PROMPTS = {"caption": "Describe this image.", "vqa": "{question}",
                "grounding": "Where is {expression}?"}


@dataclass
class Item:
    key: str
    prompt: list[Piece]
    images: list[bytes]  # encoded images the prompt shows, in order of appearance
    sizes: list[tuple[int, int]]  # their original (width, height)
    target: Any  # caption refs | VQA answers | pixel boxes | reference answer text
    extra: dict = field(default_factory=dict)  # reported with the prediction
    pixels: torch.Tensor | None = None  # [n, 3, S, S], decoded and normalised
    index: int = 0  # position in the task's item list (reorders rows gathered from ranks)

    @property
    def image(self) -> bytes:
        """The last image shown: the one a box in the answer refers to."""
        return self.images[-1]

    @property
    def size(self) -> tuple[int, int]:
        return self.sizes[-1]


def prompt_pieces(task: str, text: str, mode: str = "base",
                  chat_prompts: Mapping[str, str] | None = None) -> list[Piece]:
    """The prompt of one caption / vqa / grounding item about image 0 (no loss anywhere)."""
    if task not in CHAT_PROMPTS:
        raise ValueError(f"task {task!r} not in {tuple(CHAT_PROMPTS)}")
    if mode == "chat":
        words = {**CHAT_PROMPTS, **(chat_prompts or {})}[task]
        user = Message("user", [Part("image", image=0),
                                Part("text", text=words.format(question=text, expression=text))])
        return chat_prompt(ChatSample(key="eval", source="eval", task="chat",
                                      image_sizes=[(1, 1)], messages=[user]))
    if task == "caption":
        segs: list = [PROMPTS["caption"]]
    elif task == "vqa":
        segs = [PROMPTS["vqa"].format(question=text)]
    else:  # the expression is data text (tokenised without specials), markup stays special
        segs = [Special(tk.REF_START), text, Special(tk.REF_END), Special(tk.BOX_START)]
    return [(ImageSlot(0), False), *((s, False) for s in segs)]


def pieces_text(pieces: Sequence[Piece]) -> str:
    """Pieces as text: special tokens written out, an image as `<img></img>`."""
    out = []
    for seg, _ in pieces:
        if isinstance(seg, ImageSlot):
            out.append(tk.IMG_START + tk.IMG_END)
        else:
            out.append(seg.token if isinstance(seg, Special) else seg)
    return "".join(out)


def _item(key: str, prompt: list[Piece], record: Record, target: Any, extra: dict) -> Item:
    order = [seg.index for seg, _ in prompt if isinstance(seg, ImageSlot)]
    sample = record.sample
    return Item(key, prompt, [sample.images[i] for i in order],
                [sample.image_sizes[i] for i in order], target, extra)


def _chat_items(record: Record) -> Iterator[Item]:
    s = record.sample
    assert isinstance(s, ChatSample)
    for j, message in enumerate(s.messages):
        if message.role != "assistant" or not any(m.role == "user" for m in s.messages[:j]):
            continue
        before = ChatSample(key=s.key, source=s.source, task="chat", image_sizes=s.image_sizes,
                            messages=s.messages[:j])
        with_turn = ChatSample(key=s.key, source=s.source, task="chat",
                               image_sizes=s.image_sizes, messages=s.messages[:j + 1])
        # The turn's content: what stage 3 adds after `<|im_start|>assistant\n` and before
        # its `<|im_end|>\n`.
        reference = pieces_text(render(with_turn, "sft")[len(render(before, "sft")) + 2:-2])
        last = s.messages[j - 1]
        user = " ".join(p.text for p in last.content if p.type == "text" and p.text)
        yield _item(f"{s.key}#{j}", chat_prompt(before), record, reference,
                    {"prompt": user, "reference": reference})


def items_of(task: str, record: Record, mode: str = "base",
             chat_prompts: Mapping[str, str] | None = None) -> Iterator[Item]:
    """The eval items of one record of a record task that `task` reads."""
    sample, raw = record.sample, record.raw
    if task == "chat":
        yield from _chat_items(record)
        return
    key = sample.key

    def prompt(text: str) -> list[Piece]:
        return prompt_pieces(task, text, mode, chat_prompts)

    if task == "caption":
        refs = raw.get("captions") or [sample.caption]  # extra references when present
        words = (PROMPTS["caption"] if mode == "base"
                 else {**CHAT_PROMPTS, **(chat_prompts or {})}["caption"])
        yield _item(key, prompt(""), record, [str(r) for r in refs], {"prompt": words})
    elif task == "vqa":
        for i, qa in enumerate(sample.qa):
            yield _item(f"{key}#{i}", prompt(qa.question), record, qa.answers or [qa.answer],
                        {"prompt": qa.question, "reference": qa.answer})
    else:
        for i, ref in enumerate(sample.refs):
            yield _item(f"{key}#{i}", prompt(ref.expression), record,
                        [tuple(b) for b in ref.boxes], {"prompt": ref.expression})


def iter_records(shards: Sequence[str], tasks: Collection[str], counts: dict[str, int], *,
                 max_image_pixels: int = MAX_IMAGE_PIXELS,
                 use: Callable[[Record], Iterable[T]]) -> Iterator[T]:
    """`use(record)` for every record of `tasks` in the shard files, in shard order; records
    are read as the training loader reads them (`read_record`). A record that fails to
    read or to use (SampleError, ValueError, KeyError) is counted in `counts` by reason."""
    for path in shards:
        index = index_tar(path)
        if index.error:
            counts["bad_tar"] = counts.get("bad_tar", 0) + 1
        f = ShardFile(path)
        try:
            for entry in index.entries:
                try:
                    record = read_record(entry, f, max_image_pixels=max_image_pixels,
                                         tasks=tasks)
                    if record is not None:
                        yield from use(record)
                except (SampleError, ValueError, KeyError) as e:
                    reason = getattr(e, "reason", "bad_record")
                    counts[reason] = counts.get(reason, 0) + 1
        finally:
            f.close()


def iter_items(shards: Sequence[str], task: str, counts: dict[str, int], *,
               max_image_pixels: int = MAX_IMAGE_PIXELS, mode: str = "base",
               chat_prompts: Mapping[str, str] | None = None) -> Iterator[Item]:
    """Eval items of `task` from shard files, in shard order (skips counted in `counts`)."""
    return iter_records(shards, RECORD_TASKS[task], counts, max_image_pixels=max_image_pixels,
                        use=lambda record: list(items_of(task, record, mode, chat_prompts)))


def record_tasks(shards: Sequence[str]) -> Counter:
    """How many records of each task the shards hold (from the JSON members alone)."""
    found: Counter = Counter()
    for path in shards:
        f = ShardFile(path)
        try:
            for entry in index_tar(path).entries:
                try:
                    raw = json.loads(f.read(entry.members["json"]))
                    found[str(raw.get("task"))] += 1
                except (KeyError, ValueError, OSError, AttributeError):
                    found["unreadable"] += 1
        finally:
            f.close()
    return found


def why_empty(task: str, shards: Sequence[str], skipped: Mapping[str, int]) -> str:
    """Why `task` found no items in `shards`, naming what the shards hold instead."""
    wanted = RECORD_TASKS[task]
    if not shards:
        return "no shard matched the pattern"
    found = record_tasks(shards)
    held = ", ".join(f"{t} {n}" for t, n in found.most_common()) or "no records"
    if not any(found[t] for t in wanted):
        fits = [t for t in EVAL_TASKS if any(found[r] for r in RECORD_TASKS[t])]
        hint = f"; evaluate them with task {' / '.join(fits)}" if fits else ""
        return (f"the shards hold no {' / '.join(wanted)} records (they hold: {held})"
                f"{hint}")
    return (f"every {' / '.join(wanted)} record was skipped ({dict(skipped)}) or gave no "
            f"item (shards hold: {held})")
