"""The offline demo set: deterministic bytes, every task present and valid, exact boxes and
quads, and the build-time budgets."""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
from PIL import Image

from data_recipes.demo import FULL, SMALL, VAL_SMALL, build_demo
from data_recipes.demo.assets import cjk_font_path
from data_recipes.demo.scenes import COLOURS
from data_recipes.wds import read_samples
from qwenvl_train.data.records import parse_record
from qwenvl_train.data.schema import TASKS


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_small")
    start = time.perf_counter()
    manifest = build_demo(out, small=True)
    return out, manifest, time.perf_counter() - start


def test_small_build_is_deterministic_fast_and_complete(small, tmp_path):
    out, manifest, seconds = small
    assert seconds < 10
    again = build_demo(tmp_path / "again", small=True)
    assert _digests(out) == _digests(tmp_path / "again")
    assert _digests(out / "val") == _digests(tmp_path / "again" / "val")
    assert {t: m["num_samples"] for t, m in manifest["tasks"].items()} == SMALL
    assert set(SMALL) == set(TASKS)
    assert manifest["tasks"] == again["tasks"]
    for task in TASKS:
        names = sorted(p.name for p in out.glob(f"{task}-*.tar"))
        assert names == [f"{task}-{i:05d}.tar" for i in range(len(names))] and names
        assert (out / f"{task}-manifest.json").exists()
    assert (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".demo-build")]


def test_every_record_validates_and_images_match(small):
    out, _, _ = small
    samples = read_samples(str(out))
    assert len(samples) == sum(SMALL.values())
    for key, (rec, images) in samples.items():
        s = parse_record(rec, key, image_indices=set(range(len(images))))
        for data, (w, h) in zip(images, s.image_sizes, strict=True):
            assert Image.open(io.BytesIO(data)).size == (w, h)
    chats = [r for r, _ in samples.values() if r["task"] == "chat"]
    assert any(len(r["images"]) == 2 for r in chats)  # multi-image dialogues
    assert any(not r["images"] for r in chats)  # text-only dialogues
    parts = [p for r in chats for m in r["messages"] for p in m["content"]]
    assert any(p["type"] == "box" and "boxes" in p for p in parts)
    assert any(p["type"] == "box" and "boxes_1000" in p for p in parts)
    sources = {r["source"] for r, _ in samples.values()}
    assert {"demo_docs_en", "easy_vqa", "demo_photos"} <= sources
    if cjk_font_path() is not None:  # Chinese pages need the pylopdf-fonts-zh-cn package
        assert "demo_docs_zh" in sources


def test_scene_boxes_are_exact(small):
    """Inside each box the shape's colour touches all four sides; outside, none of it."""
    out, _, _ = small
    for key, (rec, images) in read_samples(str(out), "ref_grounding-*.tar").items():
        arr = np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB")).astype(int)
        for ref in rec["refs"]:
            x1, y1, x2, y2 = (int(v) for v in ref["boxes"][0])
            inside = arr[y1:y2, x1:x2]
            colour = next(c for c in COLOURS.values()
                          if (np.abs(inside - c).sum(-1) == 0).sum() > 50)
            hit = np.abs(inside - colour).sum(-1) == 0
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any(), key
            ring = np.abs(arr[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] - colour).sum(-1)
            assert (ring == 0).sum() == hit.sum(), key  # no pixels of it just outside


def test_ocr_quads_cover_the_ink(small):
    out, _, _ = small
    checked = 0
    for key, (rec, images) in read_samples(str(out), "ocr-*.tar").items():
        quads = [r["quad"] for r in rec["regions"]]
        if any(abs(q[0][1] - q[1][1]) > 0.01 for q in quads):
            continue  # rotated page: resampling blurs the ink edges
        arr = np.asarray(Image.open(io.BytesIO(images[0])).convert("L")).astype(int)
        ink = arr < arr[0, 0] - 60
        covered = np.zeros_like(ink)
        for q in quads:
            x1, y1 = int(q[0][0]), int(q[0][1])
            x2, y2 = int(np.ceil(q[2][0])), int(np.ceil(q[2][1]))
            assert ink[y1:y2, x1:x2].any(), key  # each line's box holds text
            covered[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = True
        assert not (ink & ~covered).any(), key  # and no text lies outside the boxes
        checked += 1
    assert checked >= 5


def test_full_build_counts_and_time(tmp_path):
    start = time.perf_counter()
    manifest = build_demo(tmp_path, small=False)
    assert time.perf_counter() - start < 60
    assert {t: m["num_samples"] for t, m in manifest["tasks"].items()} == FULL
    assert len(list(tmp_path.glob("caption-*.tar"))) == 4
    build_demo(tmp_path, small=True)  # a smaller rebuild leaves no stale shards behind
    assert sum(1 for _ in tmp_path.glob("*.tar")) == sum(
        len(m["shards"]) for m in build_demo(tmp_path, small=True)["tasks"].values())


def test_held_out_split_is_complete_and_unseen(small):
    """val/: one shard per eval task; its caption, VQA and scene images are none of the
    training images (dialogues may show the same few photos as training does)."""
    out, manifest, _ = small
    assert {t: m["num_samples"] for t, m in manifest["val"].items()} == VAL_SMALL
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == [
        f"{t}-00000.tar" for t in sorted(VAL_SMALL)]
    train, val = read_samples(str(out)), read_samples(str(out / "val"))
    assert len(val) == sum(VAL_SMALL.values()) and not set(val) & set(train)
    seen = {img for _, images in train.values() for img in images}
    for rec, images in val.values():
        parse_record(rec, "k", image_indices=set(range(len(images))))
        if rec["task"] != "chat":
            assert not any(img in seen for img in images), rec
        if rec["task"] == "caption":  # every caption of the photo is a reference
            assert rec["caption"] in rec["captions"]
