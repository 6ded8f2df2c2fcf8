"""Shared builders for the data tests: small images, one record per task, shard sets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl_train.data.shards import ShardWriter


def image_bytes(w: int = 64, h: int = 48, fmt: str = "JPEG", seed: int = 0,
                mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize((w, h), Image.Resampling.NEAREST)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


IM = [{"width": 64, "height": 48}]


def record(task: str, i: int = 0, source: str = "src") -> dict:
    """A valid record of `task` (the i-th: text varies with i so keys/lengths differ)."""
    base = {"task": task, "source": source, "images": IM}
    if task == "caption":
        return {**base, "caption": f"A photo number {i}" + " of a cat" * (i % 3)}
    if task == "vqa":
        return {**base, "qa": [{"question": f"How many? {i}", "answer": str(i % 7)}]}
    if task in ("grounding", "ref_grounding"):
        return {**base, "refs": [{"expression": f"thing {i}", "boxes": [[0, 0, 32, 24]]}]}
    if task == "grounded_caption":
        return {**base, "caption": "A cat on a sofa.",
                "spans": [{"start": 2, "end": 5, "boxes": [[1, 2, 30, 40]]}]}
    if task == "ocr":
        return {**base, "regions": [{"text": f"word{i}",
                                     "quad": [[0, 0], [20, 0], [20, 10], [0, 10]]}]}
    if task == "text":
        return {"task": "text", "source": source, "images": [],
                "text": "Plain text. " * (1 + i % 5)}
    return {**base, "messages": [
        {"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": f"What is {i}?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"It is {i}."}]}]}


def write_task_shards(root: Path, tasks: tuple[str, ...], per_task: int, per_shard: int,
                      source: str | None = None) -> None:
    """`{task}-NNNNN.tar` shards with `per_task` samples of each task."""
    img = image_bytes()
    for t in tasks:
        with ShardWriter(root, prefix=t, max_samples=per_shard) as w:
            for i in range(per_task):
                rec = record(t, i, source or t)
                w.write(f"{t}{i:05d}", rec, [("jpg", img)] * len(rec["images"]))


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with arbitrary (possibly broken) members, bypassing validation."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def jrec(rec: dict) -> bytes:
    return json.dumps(rec).encode()


def write_defect_shards(root: Path) -> list[str]:
    """Good caption samples plus one sample of each defect (b-defects.tar; keys name the
    defect) and a truncated shard; returns the good keys."""
    img = image_bytes()
    good = [f"good{i}" for i in range(6)]
    members = []
    for k in good[:4]:
        members += [(f"{k}.json", jrec(record("caption"))), (f"{k}.0.jpg", img)]
    write_raw_tar(root / "a-good.tar", members)
    big = image_bytes(300, 300)
    defects = [
        ("badjpeg", jrec(record("caption")), b"\xff\xd8\xff garbage"),
        ("badjson", b'{"task": "caption", ', img),
        ("noimage", jrec(record("caption")), None),
        ("huge", jrec({**record("caption"), "images": [{"width": 300, "height": 300}]}), big),
        ("outside", jrec({**record("grounding"), "refs": [{"expression": "x",
                                                           "boxes": [[0, 0, 90, 10]]}]}), img),
        ("toolong", jrec({**record("vqa"), "qa": [{"question": "word " * 200,  # answer cut
                                                   "answer": "x"}]}), img),
        ("nocaption", jrec({"task": "caption", "source": "s", "images": IM}), img),
    ]
    members = []
    for key, js, im in defects:
        members.append((f"{key}.json", js))
        if im is not None:
            members.append((f"{key}.0.jpg", im))
    members += [(f"{good[4]}.json", jrec(record("caption"))), (f"{good[4]}.0.jpg", img)]
    write_raw_tar(root / "b-defects.tar", members)
    write_raw_tar(root / "c-truncated.tar", [
        (f"{good[5]}.json", jrec(record("caption"))), (f"{good[5]}.0.jpg", img),
        ("cut.json", jrec(record("caption")) * 40), ("cut.0.jpg", img)])
    path = root / "c-truncated.tar"
    data = path.read_bytes()
    path.write_bytes(data[:1536 + len(img) + 700])  # inside cut.json's data
    return good
