"""Real VQA from the `easy-vqa` package (MIT): 64x64 images of one coloured shape with
questions and one-word answers, read from the files the package installs."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import lru_cache

from data_recipes.common import Converted

QA = tuple[str, str]


@lru_cache(maxsize=1)
def _questions_by_image() -> dict[int, list[QA]]:
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_train_questions()
    by_image: dict[int, list[QA]] = defaultdict(list)
    for q, a, i in zip(texts, answers, image_ids, strict=True):
        by_image[int(i)].append((q[:1].upper() + q[1:], a))
    return dict(by_image)


@lru_cache(maxsize=1)
def _image_paths() -> dict[int, str]:
    import easy_vqa

    return {int(k): v for k, v in easy_vqa.get_train_image_paths().items()}


def image_bytes(image_id: int) -> bytes:
    with open(_image_paths()[image_id], "rb") as f:
        return f.read()


def pick_qa(image_id: int, rng: random.Random, k: int) -> list[QA]:
    """An open question ("what ...", answered by a colour or shape) first when there is one,
    then yes/no questions: the open ones are what a tiny model can learn from pixels."""
    qas = _questions_by_image()[image_id]
    open_q = [qa for qa in qas if qa[0].lower().startswith("what")]
    closed = [qa for qa in qas if qa not in open_q]
    picked = rng.sample(open_q, min(1, len(open_q)))
    picked += rng.sample(closed, min(k - len(picked), len(closed)))
    return picked


def image_ids(n: int, offset: int = 0) -> list[int]:
    ids = sorted(_questions_by_image())
    return ids[offset : offset + n]


def vqa_samples(n: int, seed: int = 0, qa_per_sample: int = 2) -> list[Converted]:
    rng = random.Random(seed)
    out = []
    for image_id in image_ids(n):
        qas = pick_qa(image_id, rng, qa_per_sample)
        record = {"task": "vqa", "source": "easy_vqa", "images": [{"width": 64, "height": 64}],
                  "qa": [{"question": q, "answer": a} for q, a in qas]}
        out.append(Converted(f"easyvqa_{image_id:05d}", record, [("png", image_bytes(image_id))]))
    return out
