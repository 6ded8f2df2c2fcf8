"""Caption converters: COCO Captions and img2dataset webdataset output (with cleaning)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from data_recipes import run_conversion
from data_recipes.coco_captions import CocoCaptions
from data_recipes.img2dataset import Img2Dataset
from data_recipes.wds import read_samples


def _jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def test_coco_captions(tmp_path):
    (tmp_path / "train2017").mkdir()
    a, b = _jpeg((64, 48)), _jpeg((50, 40), (0, 0, 255))
    (tmp_path / "train2017" / "000000000009.jpg").write_bytes(a)
    (tmp_path / "train2017" / "000000000025.jpg").write_bytes(b)
    ann = {
        "info": {"description": "COCO 2017 Dataset"}, "licenses": [{"id": 1, "name": "x"}],
        "images": [{"license": 1, "file_name": "000000000009.jpg", "height": 48, "width": 64,
                    "id": 9},
                   {"license": 1, "file_name": "000000000025.jpg", "height": 40, "width": 50,
                    "id": 25}],
        "annotations": [
            {"image_id": 9, "id": 661611, "caption": "Closeup of bins of food that include "
                                                       "broccoli and bread.\n"},
            {"image_id": 9, "id": 661977, "caption": "A meal is presented in brightly colored "
                                                       "plastic trays."},
            {"image_id": 25, "id": 122, "caption": "A giraffe  eating food from the top of "
                                                     "the tree."},
            {"image_id": 25, "id": 123, "caption": "   "},
            {"image_id": 77, "id": 124, "caption": "No such image."},
        ],
    }
    (tmp_path / "annotations").mkdir()
    src = tmp_path / "annotations" / "captions_train2017.json"
    src.write_text(json.dumps(ann))
    conv = CocoCaptions(str(src))
    assert conv.image_root == str(tmp_path / "train2017")
    m = run_conversion(conv, tmp_path / "out", max_samples=2)
    assert m["num_samples"] == 3
    assert m["skipped"] == {"empty_caption": 1, "unknown_image_id": 1}
    assert [s["samples"] for s in m["shards"]] == [2, 1]
    got = read_samples(str(tmp_path / "out"))
    assert got["coco661611"] == ({"task": "caption", "source": "coco",
                                  "images": [{"width": 64, "height": 48}],
                                  "caption": "Closeup of bins of food that include broccoli "
                                             "and bread."}, [a])
    assert got["coco122"][0]["caption"] == "A giraffe eating food from the top of the tree."
    assert got["coco122"][1] == [b]


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    path.write_bytes(_tar_bytes(samples))


def _sample(key: str, size=(100, 80), caption="a dog on a beach", status="success", **kw):
    meta = {"url": f"http://x/{key}.jpg", "caption": caption, "key": key, "status": status,
            "error_message": None, "width": size[0], "height": size[1]}
    s = {"__key__": key, "jpg": _jpeg(size), "txt": caption.encode(),
         "json": json.dumps(meta).encode()}
    s.update(kw)
    return s


def test_img2dataset_filters_and_reshards(tmp_path):
    src = tmp_path / "laion"
    src.mkdir()
    _tar(src / "00000.tar", [
        _sample("000000000"), _sample("000000001", caption="a red bus"),
        _sample("000000002", size=(40, 40)),                       # too_small
        _sample("000000003", size=(400, 80)),                      # aspect_ratio
        _sample("000000004", caption=" "),                         # empty_caption
        _sample("000000005", caption="word " * 200),               # caption_too_long
        _sample("000000006", jpg=b"not a jpeg"),                   # bad_image
        {"__key__": "000000007", "txt": b"no image"},              # missing_member
    ])
    _tar(src / "00001.tar", [_sample(f"00001000{i}") for i in range(3)])
    (src / "00002.tar").write_bytes(_tar_bytes([_sample("000020000")])[:1500])  # truncated
    m = run_conversion(Img2Dataset(str(src), source="laion"), tmp_path / "out",
                       max_samples=2, workers=2)
    assert m["num_samples"] == 5
    assert m["skipped"] == {"too_small": 1, "aspect_ratio": 1, "empty_caption": 1,
                            "caption_too_long": 1, "bad_image": 1, "missing_member": 1,
                            "broken_tar": 1}
    assert all(s["samples"] <= 2 for s in m["shards"])
    assert [s["name"] for s in m["shards"]] == [
        "img2dataset-00000-00000.tar", "img2dataset-00001-00000.tar",
        "img2dataset-00001-00001.tar"]
    got = read_samples(str(tmp_path / "out"))
    rec, ims = got["000000001"]
    assert rec == {"task": "caption", "source": "laion", "caption": "a red bus",
                   "images": [{"width": 100, "height": 80}]}
    assert ims == [_sample("x")["jpg"]]


def _tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _photo_jpeg(size=(640, 480)) -> bytes:
    """A JPEG with detail (a gradient under noise), so most of its bytes are entropy-coded
    data: cutting it leaves a valid header and a truncated scan."""
    noise = Image.effect_noise(size, 80).convert("RGB")
    gradient = Image.linear_gradient("L").resize(size).convert("RGB")
    buf = io.BytesIO()
    Image.blend(gradient, noise, 0.4).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_truncated_jpeg_is_a_bad_image(tmp_path):
    good = _photo_jpeg()
    cut = good[: len(good) * 6 // 10]
    with Image.open(io.BytesIO(cut)) as im:
        im.verify()  # the old check: a truncated JPEG passes it
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "1.jpg").write_bytes(good)
    (tmp_path / "train2017" / "2.jpg").write_bytes(cut)
    ann = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "noise"},
                           {"id": 20, "image_id": 2, "caption": "cut noise"}]}
    (tmp_path / "annotations").mkdir()
    src = tmp_path / "annotations" / "captions_train2017.json"
    src.write_text(json.dumps(ann))
    m = run_conversion(CocoCaptions(str(src)), tmp_path / "out")
    assert m["num_samples"] == 1 and m["skipped"] == {"bad_image": 1}
    assert list(read_samples(str(tmp_path / "out"))) == ["coco10"]
    [problem] = map(json.loads, (tmp_path / "out" / "coco_captions-problems.jsonl")
                    .read_text().splitlines())
    assert problem["key"] == "coco20" and problem["reason"] == "bad_image"
    assert "2.jpg" in problem["detail"] and "truncated" in problem["detail"]

    src = tmp_path / "laion"
    src.mkdir()
    _tar(src / "00000.tar", [_sample("a", jpg=good), _sample("b", jpg=cut)])
    m = run_conversion(Img2Dataset(str(src)), tmp_path / "wds")
    assert m["num_samples"] == 1 and m["skipped"] == {"bad_image": 1}
    assert m["problem_examples"] == {"bad_image": ["b"]}


def test_img2dataset_unreadable_metadata_is_kept_and_reported(tmp_path, caplog):
    src = tmp_path / "laion"
    src.mkdir()
    samples = [_sample("000000000"),
               _sample("000000001", json=b'{"url": "http://x/1.jpg", "caption": "a dog'),
               _sample("000000002", json=b"[1, 2]")]
    no_txt = _sample("000000003", json=b"\xff\xfe")
    del no_txt["txt"]  # no caption of its own
    _tar(src / "00000.tar", [*samples, no_txt])
    with caplog.at_level("WARNING", logger="data_recipes.runner"):
        m = run_conversion(Img2Dataset(str(src)), tmp_path / "out")
    assert m["num_samples"] == 3  # the caption and image are good: the record lacks nothing
    assert m["kept_with_problems"] == {"bad_metadata": 2}
    assert m["skipped"] == {"bad_metadata": 1}  # its caption would have come from the json
    got = read_samples(str(tmp_path / "out"))
    assert got["000000001"][0]["caption"] == "a dog on a beach"
    problems = [json.loads(line) for line in
                (tmp_path / "out" / "img2dataset-problems.jsonl").read_text().splitlines()]
    assert [(p["key"], p["reason"], p["kept"]) for p in problems] == [
        ("000000001", "bad_metadata", True), ("000000002", "bad_metadata", True),
        ("000000003", "bad_metadata", False)]
    assert "000000001.json" in problems[0]["detail"]
    assert "kept 000000001 (bad_metadata" in caplog.text
    assert "skipped 000000003 (bad_metadata" in caplog.text
