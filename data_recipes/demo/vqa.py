"""Real VQA from the `easy-vqa` package (MIT): 64x64 images of one coloured shape with
questions and one-word answers, read from the files the package installs. Its `train` split
feeds the training shards and the dialogues, its `test` split the held-out (val) shards."""

from __future__ import annotations

import random
from collections import defaultdict
from functools import lru_cache

from data_recipes.common import Converted

QA = tuple[str, str]


@lru_cache(maxsize=2)
def _questions_by_image(split: str = "train") -> dict[int, list[QA]]:
    import easy_vqa

    get = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    texts, answers, image_ids = get()
    by_image: dict[int, list[QA]] = defaultdict(list)
    for q, a, i in zip(texts, answers, image_ids, strict=True):
        by_image[int(i)].append((q[:1].upper() + q[1:], a))
    return dict(by_image)


@lru_cache(maxsize=2)
def _image_paths(split: str = "train") -> dict[int, str]:
    import easy_vqa

    get = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    return {int(k): v for k, v in get().items()}


def image_bytes(image_id: int, split: str = "train") -> bytes:
    with open(_image_paths(split)[image_id], "rb") as f:
        return f.read()


def pick_qa(image_id: int, rng: random.Random, k: int, split: str = "train") -> list[QA]:
    """An open question ("what ...", answered by a colour or shape) first when there is one,
    then yes/no questions: the open ones are what a tiny model can learn from pixels."""
    qas = _questions_by_image(split)[image_id]
    open_q = [qa for qa in qas if qa[0].lower().startswith("what")]
    closed = [qa for qa in qas if qa not in open_q]
    picked = rng.sample(open_q, min(1, len(open_q)))
    picked += rng.sample(closed, min(k - len(picked), len(closed)))
    return picked


def image_ids(n: int, offset: int = 0, split: str = "train") -> list[int]:
    ids = sorted(_questions_by_image(split))
    return ids[offset : offset + n]


def vqa_samples(n: int, seed: int = 0, qa_per_sample: int = 2,
                split: str = "train") -> list[Converted]:
    rng = random.Random(seed)
    out = []
    prefix = "easyvqa" if split == "train" else f"easyvqa_{split}"
    for image_id in image_ids(n, split=split):
        qas = pick_qa(image_id, rng, qa_per_sample, split)
        record = {"task": "vqa", "source": "easy_vqa", "images": [{"width": 64, "height": 64}],
                  "qa": [{"question": q, "answer": a} for q, a in qas]}
        out.append(Converted(f"{prefix}_{image_id:05d}", record,
                             [("png", image_bytes(image_id, split))]))
    return out
