"""Packing invariants and the batch dict (docs/contracts.md)."""

from __future__ import annotations

import random

import torch

from qwenvl_train.data.encode import EncodedSample
from qwenvl_train.data.packing import Packer, collate
from qwenvl_train.data.schema import TASK_INDEX
from qwenvl_train.tokens import IGNORE_INDEX

PAD = 151643


def _sample(i: int, n: int, task: str, n_img: int = 0) -> EncodedSample:
    ids = torch.arange(1000 * i, 1000 * i + n)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX
    imgs = torch.full((n_img, 3, 4, 4), i % 250, dtype=torch.uint8)
    return EncodedSample(ids, labels, imgs, task, "src", f"k{i}", address=[i])


def _stream(count: int, seed: int = 0) -> list[EncodedSample]:
    rnd = random.Random(seed)
    tasks = ["caption", "vqa", "ocr", "text"]
    return [_sample(i, rnd.randint(3, 60), rnd.choice(tasks), rnd.randint(0, 1))
            for i in range(count)]


def _pack(samples, seq_len=64, buffer_rows=3):
    p = Packer(seq_len, buffer_rows)
    rows = []
    for s in samples:
        rows += p.add(s)
    return rows, p


def test_packing_invariants():
    samples = _stream(300)
    rows, p = _pack(samples)
    leftover = [r.samples for r in p.open]
    seen = [s.key for row in rows + leftover for s in row]
    assert sorted(seen) == sorted(s.key for s in samples)  # each sample exactly once
    for row in rows + leftover:
        assert len({s.task for s in row}) == 1             # same task per row
        assert sum(len(s) for s in row) <= 64               # never over, never split
    assert len(p.open) <= 3 * 4                             # buffer bound per task
    real = sum(len(s) for row in rows for s in row)
    assert real / (64 * len(rows)) > 0.85


def test_packing_is_deterministic():
    a, _ = _pack(_stream(200, seed=1))
    b, _ = _pack(_stream(200, seed=1))
    assert [[s.key for s in r] for r in a] == [[s.key for s in r] for r in b]


def test_exactly_full_row_is_emitted_at_once():
    p = Packer(10, 4)
    assert p.add(_sample(0, 6, "vqa")) == []
    out = p.add(_sample(1, 4, "vqa"))
    assert [[s.key for s in r] for r in out] == [["k0", "k1"]] and p.open == []


def test_collate_packed_rows():
    a, b, c = _sample(1, 5, "vqa", 1), _sample(2, 3, "vqa", 0), _sample(3, 4, "ocr", 2)
    batch = collate([[a, b], [c]], PAD, 4, length=10)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
                                              [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["segment_ids"].tolist() == [[1] * 5 + [2] * 3 + [0] * 2, [1] * 4 + [0] * 6]
    v, o = TASK_INDEX["vqa"], TASK_INDEX["ocr"]
    assert batch["task_ids"].tolist() == [[v] * 8 + [-1] * 2, [o] * 4 + [-1] * 6]
    assert batch["input_ids"][0, 8:].tolist() == [PAD, PAD]
    assert (batch["labels"][0, 8:] == IGNORE_INDEX).all()
    assert (batch["labels"][1, 4:] == IGNORE_INDEX).all()
    assert batch["labels"][0, 5].item() == IGNORE_INDEX  # first token of a packed sample
    assert batch["input_ids"][0, :5].tolist() == a.input_ids.tolist()
    # images row-major in order of appearance, uint8 (the model normalises them)
    assert batch["images"].shape == (3, 3, 4, 4) and batch["images"].dtype == torch.uint8
    firsts = batch["images"][:, 0, 0, 0]
    assert firsts[1] == firsts[2] and firsts[0] != firsts[1]  # a's image, then c's two
    assert batch["keys"] == ["k1", "k2", "k3"] and batch["sources"] == ["src"] * 3
    assert (batch["num_samples"], batch["num_images"], batch["num_real_tokens"]) == (3, 3, 12)


def test_collate_unpacked_pads_to_multiple():
    batch = collate([[_sample(1, 5, "text")], [_sample(2, 9, "text")]], PAD, 4,
                    pad_to_multiple_of=8, max_len=512)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["segment_ids"][0].tolist() == [1] * 5 + [0] * 11
    assert batch["position_ids"][0].tolist() == list(range(16))
    assert batch["images"].shape == (0, 3, 4, 4)
