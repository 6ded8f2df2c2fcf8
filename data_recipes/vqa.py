"""VQA sources -> `vqa` samples.

- VQAv2: `v2_OpenEnded_mscoco_train2014_questions.json` ({data_subtype, questions: [{image_id,
  question, question_id}]}) + `v2_mscoco_train2014_annotations.json` ({annotations:
  [{question_id, answers: [{answer}...] (10), multiple_choice_answer}]}) + COCO images
  `COCO_train2014_{image_id:012d}.jpg` (2017 names `{image_id:012d}.jpg` also found).
  Answer: the most common of the 10 human answers (default) or `multiple_choice_answer`;
  all 10 are kept in `qa[i].answers`, which evaluation scores with the VQAv2 rule.
- GQA balanced: `train_balanced_questions.json`, one object {question_id: {imageId,
  question, answer, fullAnswer, ...}} + `images/{imageId}.jpg`.
- Any table of (image, question, answer) rows (`vqa_table`): parquet / JSON(L), e.g. the
  Hugging Face exports of DocVQA, TextVQA, ChartQA, OCR-VQA, AI2D, DVQA. The answer field
  may hold a string, a list of strings or VQAv2-style dicts (the most common one is the
  training answer; a list of several is kept in `qa[i].answers`).
  Image paths in rows are relative to `image_root`, by default the table file's folder.

`qa_per_sample` > 1 groups consecutive questions on the same image into one sample
(fewer copies of the image in the shards); 1 keeps the paper's one-question samples.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from data_recipes.common import (
    Converted,
    Skip,
    clean_key,
    image_dir,
    load_image,
    resolve,
    row_image,
)
from data_recipes.jsonstream import iter_array, iter_object, top_level_scalars
from data_recipes.runner import Converter
from data_recipes.wds import iter_table


def answer_texts(answers: list[dict[str, Any]]) -> list[str]:
    """The non-empty human answers, whitespace-normalised, in order (repeats kept: the
    VQAv2 rule counts annotators)."""
    texts = [" ".join(str(a.get("answer", "")).split()) for a in answers]
    return [t for t in texts if t]


def most_common_answer(answers: list[dict[str, Any]]) -> str | None:
    """Majority of the human answers; ties go to the answer given first."""
    texts = answer_texts(answers)
    return Counter(texts).most_common(1)[0][0] if texts else None


def qa_record(qa: dict) -> dict:
    """A record's QA pair: the training answer, plus every reference answer when the source
    has more than one."""
    out = {"question": qa["question"], "answer": qa["answer"]}
    if len(qa.get("answers") or []) > 1:
        out["answers"] = list(qa["answers"])
    return out


def group_consecutive(items: Iterator[tuple[Any, dict]], limit: int) -> Iterator[Any]:
    """(image, qa) pairs -> (image, [qa, ...]) with at most `limit` per group."""
    image, group = None, []
    for img, qa in items:
        if group and (img != image or len(group) >= limit):
            yield image, group
            group = []
        image = img
        group.append(qa)
    if group:
        yield image, group


class _VQABase(Converter):
    task = "vqa"

    def _pairs(self) -> Iterator[tuple[Any, dict]]:
        raise NotImplementedError

    def _image_path(self, image_id: Any) -> str:
        raise NotImplementedError

    def items(self) -> Iterator[Any]:
        yield from group_consecutive(self._pairs(), self.qa_per_sample)

    def _image(self, image_id: Any):
        return load_image(self._image_path(image_id))

    def item_key(self, item: Any) -> str:
        return clean_key(f"q{item[1][0]['id']}")

    def convert(self, item: Any) -> Converted:
        image_id, qas = item
        qas = [q for q in qas if q["answer"]]
        if not qas:
            raise Skip("no_answer")
        im = self._image(image_id)
        record = {"task": "vqa", "source": self.source,
                  "images": [{"width": im.width, "height": im.height}],
                  "qa": [qa_record(q) for q in qas]}
        return Converted(self.item_key(item), record, [(im.ext, im.data)])


class VQAv2(_VQABase):
    name = "vqav2"
    option_choices = {"answer": ("most_common", "multiple_choice")}

    def __init__(self, src: str, annotations: str | None = None, image_root: str | None = None,
                 answer: str = "most_common", qa_per_sample: int = 1, source: str = "vqav2"):
        if answer not in ("most_common", "multiple_choice"):
            raise ValueError(f"answer: {answer!r}, expected most_common | multiple_choice")
        self.src, self.annotations = src, annotations
        self.image_root = image_dir(image_root) if image_root else image_dir(
            os.path.dirname(os.path.abspath(src)), "the questions file's folder")
        self.answer, self.qa_per_sample, self.source = answer, qa_per_sample, source
        self.subtype = str(top_level_scalars(src).get("data_subtype", ""))

    def inputs(self) -> list[str]:
        return [self.src] + ([self.annotations] if self.annotations else [])

    def _pairs(self) -> Iterator[tuple[Any, dict]]:
        answers: dict[Any, tuple[str | None, list[str]]] = {}
        if self.annotations:
            for a in iter_array(self.annotations, "annotations"):
                humans = a.get("answers") or []
                if self.answer == "most_common":
                    answer = most_common_answer(humans)
                else:
                    answer = a.get("multiple_choice_answer")
                answers[a["question_id"]] = (answer, answer_texts(humans))
        for q in iter_array(self.src, "questions"):
            answer, humans = answers.get(q["question_id"], (None, []))
            qa = {"id": q["question_id"], "question": " ".join(str(q["question"]).split()),
                  "answer": answer, "answers": humans}
            yield q["image_id"], qa

    def _image_path(self, image_id: Any) -> str:
        name = os.path.join(self.image_root, f"COCO_{self.subtype}_{int(image_id):012d}.jpg")
        if not os.path.exists(name):
            alt = os.path.join(self.image_root, f"{int(image_id):012d}.jpg")
            name = alt if os.path.exists(alt) else name
        return name


class GQA(_VQABase):
    name = "gqa"
    option_choices = {"answer": ("short", "full")}

    def __init__(self, src: str, image_root: str | None = None, answer: str = "short",
                 qa_per_sample: int = 1, source: str = "gqa"):
        if answer not in ("short", "full"):
            raise ValueError(f"answer: {answer!r}, expected short | full")
        self.src, self.answer, self.qa_per_sample, self.source = src, answer, qa_per_sample, source
        self.image_root = image_dir(image_root) if image_root else image_dir(
            os.path.join(os.path.dirname(os.path.abspath(src)), "images"),
            "GQA's layout: images/ beside the questions file")

    def _pairs(self) -> Iterator[tuple[Any, dict]]:
        field = "answer" if self.answer == "short" else "fullAnswer"
        for qid, q in iter_object(self.src):
            ans = " ".join(str(q.get(field) or "").split()) or None
            yield q["imageId"], {"id": qid, "question": q["question"], "answer": ans}

    def _image_path(self, image_id: Any) -> str:
        return os.path.join(self.image_root, f"{image_id}.jpg")


def answer_of(value: Any) -> str | None:
    """A string, a list of strings (majority) or VQAv2-style [{"answer": ...}] dicts."""
    if isinstance(value, str):
        return " ".join(value.split()) or None
    if isinstance(value, list) and value:
        return most_common_answer(_as_dicts(value))
    return None


def answers_of(value: Any) -> list[str]:
    """Every reference answer of a list-valued answer field (none for a single string)."""
    return answer_texts(_as_dicts(value)) if isinstance(value, list) else []


def _as_dicts(values: list) -> list[dict[str, Any]]:
    return [v if isinstance(v, dict) else {"answer": v} for v in values]


class VQATable(_VQABase):
    """Rows of (image, question, answer) from parquet / JSON(L) files -> `vqa`."""

    name = "vqa_table"
    source_exts = (".parquet", ".jsonl", ".json")

    def __init__(self, src: str, image_root: str | None = None, question_field: str = "question",
                 answer_field: str = "answers", image_field: str = "image",
                 qa_per_sample: int = 1, source: str = "vqa"):
        self.src, self.source = src, source
        self.image_root = image_dir(image_root) if image_root else None
        self.question_field, self.answer_field = question_field, answer_field
        self.image_field, self.qa_per_sample = image_field, qa_per_sample

    def _pairs(self) -> Iterator[tuple[Any, dict]]:
        index = 0
        for path in self.source_files():
            # Image paths in rows are relative to image_root, default the table's folder.
            root = self.image_root or os.path.dirname(os.path.abspath(path))
            for row in iter_table(path):
                q = " ".join(str(row.get(self.question_field) or "").split())
                ans = row.get(self.answer_field, row.get("answer"))
                img = row.get(self.image_field)
                # Rows carrying image bytes travel with the item; paths are read in the worker.
                image = resolve(root, img) if isinstance(img, str) else {
                    self.image_field: img, "key": row.get("key"), "root": root}
                yield image, {"id": row.get("question_id", index), "question": q,
                              "answer": answer_of(ans) if q else None,
                              "answers": answers_of(ans)}
                index += 1

    def _image(self, image_id: Any):
        if isinstance(image_id, str):
            return load_image(image_id)
        return row_image(image_id, image_id["root"], self.image_field)
