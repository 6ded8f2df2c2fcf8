"""Record validation (reason codes), the shard writer and its manifest, image transforms."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from data_fixtures import IM, image_bytes, record
from PIL import Image

from qwenvl_train.data.images import CLIP_MEAN, CLIP_STD, load_image, load_image_uint8
from qwenvl_train.data.records import parse_record
from qwenvl_train.data.schema import (
    TASKS,
    ChatSample,
    GroundedCaptionSample,
    SampleError,
    VQASample,
)
from qwenvl_train.data.shards import ShardWriter, read_manifests


@pytest.mark.parametrize("task", TASKS)
def test_every_task_parses_to_its_class(task):
    s = parse_record(json.dumps(record(task, 3)).encode(), "key3")
    assert (s.task, s.key, s.source) == (task, "key3", "src")
    assert len(s.images) == len(s.image_sizes)


def test_typed_fields():
    s = parse_record(record("vqa", 2), "k")
    assert isinstance(s, VQASample) and s.qa[0].answer == "2"
    g = parse_record(record("grounded_caption"), "k")
    assert isinstance(g, GroundedCaptionSample) and g.spans[0].boxes == [(1, 2, 30, 40)]
    c = parse_record(record("chat"), "k")
    assert isinstance(c, ChatSample) and [m.role for m in c.messages] == ["user", "assistant"]


@pytest.mark.parametrize("rec,reason", [
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    ({"task": "nope", "source": "s"}, "bad_record"),
    ({"task": "caption", "images": IM, "caption": "x"}, "bad_record"),        # no source
    ({"task": "caption", "source": "s", "images": IM}, "bad_record"),         # no caption
    ({"task": "caption", "source": "s", "images": [], "caption": "x"}, "bad_record"),
    ({"task": "text", "source": "s", "images": IM, "text": "x"}, "bad_record"),
    ({"task": "caption", "source": "s", "images": [{"width": 0, "height": 5}],
      "caption": "x"}, "bad_record"),
    ({"task": "caption", "source": "s", "images": [{"width": 100000, "height": 100000}],
      "caption": "x"}, "image_too_large"),
    ({"task": "grounding", "source": "s", "images": IM,
      "refs": [{"expression": "a", "boxes": [[0, 0, 65.5, 10]]}]}, "box_outside_image"),
    ({"task": "grounding", "source": "s", "images": IM,
      "refs": [{"expression": "a", "boxes": [[10, 0, 5, 10]]}]}, "bad_record"),  # x1 > x2
    ({"task": "grounding", "source": "s", "images": IM,
      "refs": [{"expression": "a", "boxes": [[0, 0, float("nan"), 1]]}]}, "bad_record"),
    ({"task": "ocr", "source": "s", "images": IM,
      "regions": [{"text": "a", "quad": [[0, 0], [1, 0], [1, 99], [0, 1]]}]},
     "box_outside_image"),
    ({"task": "grounded_caption", "source": "s", "images": IM, "caption": "abc",
      "spans": [{"start": 1, "end": 9, "boxes": [[0, 0, 1, 1]]}]}, "bad_record"),
])
def test_rejections_carry_reason(rec, reason):
    with pytest.raises(SampleError) as e:
        parse_record(rec, "k", max_image_pixels=89478485)
    assert e.value.reason == reason


def test_box_on_the_border_is_accepted():
    rec = {"task": "grounding", "source": "s", "images": IM,
           "refs": [{"expression": "all", "boxes": [[0, 0, 64, 48], [-0.5, 0, 64.5, 48]]}]}
    assert len(parse_record(rec, "k").refs[0].boxes) == 2


def test_missing_image_member():
    with pytest.raises(SampleError) as e:
        parse_record(record("caption"), "k", image_indices=set())
    assert e.value.reason == "missing_image"


def test_writer_rolls_shards_and_writes_manifest(tmp_path):
    img = image_bytes()
    with ShardWriter(tmp_path, "mix", max_samples=3) as w:
        for i, task in enumerate(["caption", "vqa", "text", "chat", "caption"]):
            rec = record(task, i, source="a" if i % 2 else "b")
            w.write(f"k{i}", rec, [("jpg", img)] * len(rec["images"]))
    m = json.loads((tmp_path / "mix-manifest.json").read_text())
    assert m == w.manifest
    assert [s["name"] for s in m["shards"]] == ["mix-00000.tar", "mix-00001.tar"]
    assert m["tasks"] == {"caption": 2, "chat": 1, "text": 1, "vqa": 1}
    assert m["sources"] == {"a": 2, "b": 3} and m["num_samples"] == 5
    assert m["shards"][1]["tasks"] == {"caption": 1, "chat": 1}
    with tarfile.open(tmp_path / "mix-00000.tar") as tf:
        assert tf.getnames() == ["k0.json", "k0.0.jpg", "k1.json", "k1.0.jpg", "k2.json"]
    assert read_manifests(tmp_path)["mix-00001.tar"]["samples"] == 2


def test_writer_is_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        with ShardWriter(tmp_path / run, "x") as w:
            w.write("k0", record("caption"), [("jpg", image_bytes())])
        digests.append(hashlib.sha256((tmp_path / run / "x-00000.tar").read_bytes()).digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("key,images,reason", [
    ("k.0", [("jpg", b"")], "bad_record"),                          # dot in key
    ("k", [], "missing_image"),
    ("k", [("jpg", b"garbage")], "bad_image"),
    ("k", [("jpg", image_bytes(32, 32))], "bad_image"),             # size != declared
    ("k", [("gif", image_bytes())], "bad_record"),
])
def test_writer_validates(tmp_path, key, images, reason):
    with ShardWriter(tmp_path, "x") as w, pytest.raises(SampleError) as e:
        w.write(key, record("caption"), images)
    assert e.value.reason == reason


def test_writer_rejects_duplicate_keys(tmp_path):
    with ShardWriter(tmp_path, "x") as w:
        w.write("k", record("text"), [])
        with pytest.raises(SampleError):
            w.write("k", record("text"), [])


# ---------------------------------------------------------------- images

@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("L", "PNG"),
                                      ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")])
def test_image_modes_become_rgb(mode, fmt):
    x = load_image(image_bytes(64, 48, fmt, mode=mode), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_transparent_pixels_become_white():
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, "PNG")
    x = load_image(buf.getvalue(), 8)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 0, 0], white, atol=1e-5)


def test_normalisation_and_resize_match_pil_bicubic():
    data = image_bytes(200, 120, "PNG", seed=3)  # PNG: no draft, exact decode
    ours = load_image(data, 64).numpy()
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    ref = ((ref - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    # torch's antialiased bicubic follows PIL's to within 2 grey levels
    assert np.abs(ours - ref).max() < 2.5 / 255 / min(CLIP_STD)
    assert np.abs(ours - ref).mean() < 0.01


def test_jpeg_draft_keeps_at_least_target_size():
    big = image_bytes(1000, 500, "JPEG")
    img = Image.open(io.BytesIO(big))
    img.draft("RGB", (224, 224))
    assert img.size == (500, 250)  # scale 1/2: both sides still >= 224
    assert load_image_uint8(big, 224).shape == (3, 224, 224)


def test_bad_and_oversized_images():
    with pytest.raises(SampleError) as e:
        load_image(image_bytes()[:300], 32)  # truncated JPEG
    assert e.value.reason == "bad_image"
    with pytest.raises(SampleError) as e:
        load_image(image_bytes(64, 48), 32, max_pixels=1000)
    assert e.value.reason == "image_too_large"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (1-bit greyscale): a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_with_a_small_declared_size_is_image_too_large():
    bomb = _png_header_only(30_000, 30_000)  # 9e8 px: beyond PIL's own bomb limit
    assert len(bomb) < 100
    with pytest.raises(SampleError) as e:
        load_image_uint8(bomb, 32, expected_size=(10, 10))  # the record says 10 x 10
    assert e.value.reason == "image_too_large"
