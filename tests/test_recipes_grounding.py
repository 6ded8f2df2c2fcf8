"""Grounding converters: RefCOCO (refs pickle + instances.json) and GRIT (parquet, tars)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_recipes import run_conversion
from data_recipes.grit import GRIT
from data_recipes.refcoco import RefCOCO, load_refs
from data_recipes.wds import read_samples


def _jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _refcoco(tmp_path):
    root = tmp_path / "refcoco"
    root.mkdir()
    images = tmp_path / "train2014"
    images.mkdir()
    (images / "COCO_train2014_000000581857.jpg").write_bytes(_jpeg((640, 480)))
    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000581857_1241742.jpg",
         "ann_id": 1241742, "ref_id": 0, "image_id": 581857, "split": "train",
         "sentences": [{"tokens": ["the", "lady"], "raw": "THE LADY", "sent_id": 0,
                        "sent": "the lady"},
                       {"tokens": ["woman", "in", "front"], "raw": "woman in front",
                        "sent_id": 1, "sent": "woman in front"}],
         "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000581857_1241743.jpg",
         "ann_id": 1241743, "ref_id": 1, "image_id": 581857, "split": "testA",
         "sentences": [{"raw": "guy", "sent_id": 2, "sent": "guy"}], "category_id": 1},
        {"sent_ids": [3], "file_name": "COCO_train2014_000000581857_1.jpg", "ann_id": 1,
         "ref_id": 2, "image_id": 581857, "split": "train",
         "sentences": [{"raw": "x", "sent_id": 3, "sent": "the box outside"}],
         "category_id": 1},
    ]
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the refer toolkit's files are protocol-2 pickles
    instances = {
        "images": [{"file_name": "COCO_train2014_000000581857.jpg", "height": 480,
                    "width": 640, "id": 581857}],
        "annotations": [
            {"segmentation": [[1, 2, 3]], "area": 1.0, "iscrowd": 0, "image_id": 581857,
             "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1, "id": 1241742},
            {"image_id": 581857, "bbox": [1, 2, 3, 4], "category_id": 1, "id": 1241743},
            {"image_id": 581857, "bbox": [700, 10, 50, 50], "category_id": 1, "id": 1},
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    return root, images


def test_refcoco_ref_grounding_and_grounded_caption(tmp_path):
    root, images = _refcoco(tmp_path)
    src = str(root / "refs(unc).p")
    m = run_conversion(RefCOCO(src, image_root=str(images)), tmp_path / "ref")
    assert m["num_samples"] == 1 and m["skipped"] == {"empty_box": 1}  # testA ref filtered
    box = [103.93, 299.99, 238.15, 477.41]  # xywh -> xyxy
    got = read_samples(str(tmp_path / "ref"))
    assert got["ref0"] == ({"task": "ref_grounding", "source": "refcoco",
                            "images": [{"width": 640, "height": 480}],
                            "refs": [{"expression": "the lady", "boxes": [box]},
                                     {"expression": "woman in front", "boxes": [box]}]},
                           [_jpeg((640, 480))])
    m = run_conversion(RefCOCO(src, image_root=str(images), task="grounded_caption",
                               split="train"), tmp_path / "gcap")
    got = read_samples(str(tmp_path / "gcap"))
    assert m["num_samples"] == 2
    assert got["ref0_1"][0] == {"task": "grounded_caption", "source": "refcoco",
                                "images": [{"width": 640, "height": 480}],
                                "caption": "woman in front",
                                "spans": [{"start": 0, "end": 14, "boxes": [box]}]}


def test_refs_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.p"
    with open(path, "wb") as f:
        pickle.dump([{"x": tarfile.TarInfo}], f)
    with pytest.raises(pickle.UnpicklingError):
        load_refs(str(path))


ROW = {"key": "000373938", "caption": "a wire hanger with a paper cover that reads we heart "
                                      "our customers",
       "noun_chunks": [[0, 14, 0.092, 0.0, 0.908, 0.706, 0.477],
                       [19, 32, 0.177, 0.196, 0.816, 0.656, 0.391],
                       [19, 32, 0.5, 0.5, 0.6, 0.6, 0.2],
                       [53, 66, 0.0, 0.0, 1.0, 1.0, 0.9]],
       "ref_exps": [[0, 32, 0.092, 0.0, 0.908, 0.706, 0.477]],
       "url": "http://x", "width": 500, "height": 500}


def test_grit_parquet_tasks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000373938.jpg").write_bytes(_jpeg((200, 100)))
    rows = [ROW, {**ROW, "key": "missing"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "grit.parquet")
    src, img = str(tmp_path / "grit.parquet"), str(tmp_path / "images")
    m = run_conversion(GRIT(src, image_root=img), tmp_path / "gc")
    assert m["num_samples"] == 1 and m["skipped"] == {"missing_image": 1}
    rec, _ = read_samples(str(tmp_path / "gc"))["000373938"]
    assert rec["caption"] == ROW["caption"] and rec["images"] == [{"width": 200, "height": 100}]
    assert rec["spans"] == [
        {"start": 0, "end": 14, "boxes": [[18.4, 0.0, 181.6, 70.6]]},
        {"start": 19, "end": 32, "boxes": [[35.4, 19.6, 163.2, 65.6], [100.0, 50.0, 120.0, 60.0]]},
        {"start": 53, "end": 66, "boxes": [[0.0, 0.0, 200.0, 100.0]]}]

    run_conversion(GRIT(src, image_root=img, task="grounding", min_score=0.3), tmp_path / "g")
    rec, _ = read_samples(str(tmp_path / "g"))["000373938"]
    assert rec["task"] == "grounding" and rec["refs"] == [
        {"expression": "a wire hanger", "boxes": [[18.4, 0.0, 181.6, 70.6]]},
        {"expression": "a paper cover", "boxes": [[35.4, 19.6, 163.2, 65.6]]},
        {"expression": "our customers", "boxes": [[0.0, 0.0, 200.0, 100.0]]}]

    run_conversion(GRIT(src, image_root=img, task="ref_grounding"), tmp_path / "r")
    rec, _ = read_samples(str(tmp_path / "r"))["000373938"]
    assert rec["refs"] == [{"expression": "a wire hanger with a paper cover",
                            "boxes": [[18.4, 0.0, 181.6, 70.6]]}]


def test_grit_webdataset_tar(tmp_path):
    members = {"000373938.jpg": _jpeg((100, 50)), "000373938.txt": ROW["caption"].encode(),
               "000373938.json": json.dumps(ROW).encode(),
               "000373939.jpg": _jpeg((10, 10)),
               "000373939.json": json.dumps({**ROW, "noun_chunks": []}).encode()}
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = run_conversion(GRIT(str(tmp_path / "00000.tar")), tmp_path / "out")
    assert m["num_samples"] == 1 and m["skipped"] == {"no_boxes": 1}
    rec, ims = read_samples(str(tmp_path / "out"))["000373938"]
    assert rec["spans"][0] == {"start": 0, "end": 14, "boxes": [[9.2, 0.0, 90.8, 35.3]]}
    assert ims == [members["000373938.jpg"]]


def _refer_layout(tmp_path):
    """The refer toolkit's data/ folder: refcoco/{refs(unc).p,instances.json} and the COCO
    images under images/mscoco/images/train2014/."""
    (tmp_path / "refer" / "data").mkdir(parents=True)
    root, images = _refcoco(tmp_path / "refer" / "data")
    coco = tmp_path / "refer" / "data" / "images" / "mscoco" / "images" / "train2014"
    coco.mkdir(parents=True)
    for f in images.iterdir():
        f.rename(coco / f.name)
    return root


def test_refcoco_finds_images_in_the_refer_layout_and_converts_several_splits(
        tmp_path, monkeypatch):
    _refer_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    src = "refer/data/refcoco/refs(unc).p"  # relative, as a user types it
    m = run_conversion(RefCOCO(src), tmp_path / "train")
    assert m["num_samples"] == 1 and m["skipped"] == {"empty_box": 1}
    m = run_conversion(RefCOCO(src, split="train,testA"), tmp_path / "two")
    assert m["num_samples"] == 2 and m["skipped"] == {"empty_box": 1}
    assert sorted(read_samples(str(tmp_path / "two"))) == ["ref0", "ref1"]
    m = run_conversion(RefCOCO(src, split="all", task="grounded_caption"), tmp_path / "all")
    assert m["num_samples"] == 3  # two sentences of ref0, one of ref1
    with pytest.raises(ValueError, match="split val not in .*it has testA,train"):
        run_conversion(RefCOCO(src, split="train,val"), tmp_path / "val")
    with pytest.raises(FileNotFoundError, match=r"image folder .*mscoco/images/train2014 "
                                                r"\(the default for the refer toolkit"):
        RefCOCO(str(tmp_path / "elsewhere" / "refcoco" / "refs(unc).p"))


def test_refcoco_cli_names_a_missing_image_folder(tmp_path, capsys):
    from data_recipes.cli import main

    root, _ = _refcoco(tmp_path)  # images not where the refer toolkit keeps them
    rc = main(["convert", "refcoco", "--src", str(root / "refs(unc).p"), "--out",
               str(tmp_path / "out"), "--split", "train,testA"])
    err = capsys.readouterr().err
    assert rc == 2 and "mscoco/images/train2014" in err and "--image-root" in err
    rc = main(["convert", "refcoco", "--src", str(root / "refs(unc).p"), "--out",
               str(tmp_path / "out"), "--split", "train,testA",
               "--image-root", str(tmp_path / "train2014")])
    assert rc == 0 and len(read_samples(str(tmp_path / "out"))) == 2


# GRIT's referring expressions overlap: an expression contains its noun chunk, expressions
# share words. "a wire hanger with a paper cover that reads we heart our customers"
OVERLAPPING = {**ROW, "ref_exps": [
    [0, 32, 0.092, 0.0, 0.908, 0.706, 0.477],   # a wire hanger with a paper cover
    [0, 14, 0.092, 0.0, 0.908, 0.706, 0.477],   # a wire hanger (inside the first)
    [19, 66, 0.177, 0.196, 0.816, 0.656, 0.391],  # a paper cover ... our customers
    [19, 32, 0.177, 0.196, 0.816, 0.656, 0.391],  # a paper cover (inside both)
], "noun_chunks": [*ROW["noun_chunks"], [2, 14, 0.1, 0.1, 0.9, 0.7, 0.5]]}  # "wire hanger"


def test_grit_overlapping_expressions_all_reach_ref_grounding(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000373938.jpg").write_bytes(_jpeg((200, 100)))
    pq.write_table(pa.Table.from_pylist([OVERLAPPING]), tmp_path / "grit.parquet")
    src, img = str(tmp_path / "grit.parquet"), str(tmp_path / "images")
    counts = {}
    for task in ("ref_grounding", "grounding", "grounded_caption"):
        run_conversion(GRIT(src, image_root=img, task=task), tmp_path / task)
        rec = read_samples(str(tmp_path / task))["000373938"][0]
        counts[task] = len(rec.get("refs") or rec.get("spans"))
        if task == "ref_grounding":
            assert [r["expression"] for r in rec["refs"]] == [
                "a wire hanger", "a wire hanger with a paper cover", "a paper cover",
                "a paper cover that reads we heart our customers"]
        if task == "grounded_caption":  # one caption: its spans stay disjoint
            assert [(s["start"], s["end"]) for s in rec["spans"]] == [(0, 14), (19, 32),
                                                                        (53, 66)]
    # every expression; every noun chunk (also the one inside another); disjoint spans
    assert counts == {"ref_grounding": 4, "grounding": 4, "grounded_caption": 3}


def test_grit_row_image_paths_are_relative_to_the_table(tmp_path, monkeypatch):
    data = tmp_path / "grit"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.jpg").write_bytes(_jpeg((200, 100)))
    row = {**ROW, "key": None, "file_name": "images/a.jpg"}
    pq.write_table(pa.Table.from_pylist([row]), data / "part-0.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part
    m = run_conversion(GRIT(str(data)), tmp_path / "out")
    assert m["num_samples"] == 1 and m["skipped"] == {}
    assert list(read_samples(str(tmp_path / "out"))) == ["row000000000"]
