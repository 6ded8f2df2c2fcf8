"""OCR (SynthDoG-style metadata with quads) and plain-text JSONL converters."""

from __future__ import annotations

import io
import json

from PIL import Image

from data_recipes import run_conversion
from data_recipes.synthdog import SynthDoG, plain_ocr_record
from data_recipes.text import TextJSONL, split_text
from data_recipes.wds import read_samples


def _jpeg(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (250, 250, 250)).save(buf, "JPEG")
    return buf.getvalue()


def test_synthdog_metadata_jsonl(tmp_path):
    train = tmp_path / "synthdog-en" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        (train / f"image_{i}.jpg").write_bytes(_jpeg((200, 100)))
    gt0 = {"gt_parse": {"text_sequence": "Hello world\n你好"},
           "lines": [{"text": "Hello world", "quad": [10, 10, 90, 12, 89, 30, 9, 28]},
                     {"text": "你好", "quad": [[20, 40], [60, 40], [60, 70], [20, 70]]}],
           "words": [{"text": "Hello", "bbox": [10, 10, 45, 30]},
                     {"text": "world", "bbox": [50, 10, 90, 30]},
                     {"text": "你好", "bbox": [20, 40, 60, 70]}]}
    rows = [
        {"file_name": "image_0.jpg", "ground_truth": json.dumps(gt0, ensure_ascii=False)},
        # Plain SynthDoG output: text only, no geometry -> plain OCR.
        {"file_name": "image_1.jpg",
         "ground_truth": json.dumps({"gt_parse": {"text_sequence": "only text"}})},
        # Regions at the top level; a box that pokes out of the image is clamped.
        {"file_name": "image_2.jpg", "words": [{"text": "edge", "bbox": [150, 80, 210, 104]},
                                               {"text": "  ", "bbox": [0, 0, 5, 5]}]},
    ]
    src = train / "metadata.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    m = run_conversion(SynthDoG(str(src), source="synthdog_en"), tmp_path / "out")
    assert m["num_samples"] == 3 and m["skipped"] == {}  # the text-only row is plain OCR
    got = read_samples(str(tmp_path / "out"))
    rec, ims = got["000000000"]
    assert rec == {"task": "ocr", "source": "synthdog_en",
                   "images": [{"width": 200, "height": 100}],
                   "regions": [
                       {"text": "Hello world",
                        "quad": [[10.0, 10.0], [90.0, 12.0], [89.0, 30.0], [9.0, 28.0]]},
                       {"text": "你好",
                        "quad": [[20.0, 40.0], [60.0, 40.0], [60.0, 70.0], [20.0, 70.0]]}]}
    assert ims == [_jpeg((200, 100))]
    assert got["000000002"][0]["regions"] == [{"text": "edge", "box": [150, 80, 200, 100]}]

    run_conversion(SynthDoG(str(src), level="words"), tmp_path / "words")
    words = read_samples(str(tmp_path / "words"))["000000000"][0]["regions"]
    assert [w["text"] for w in words] == ["Hello", "world", "你好"]
    assert words[1] == {"text": "world", "box": [50, 10, 90, 30]}


def _stock_synthdog(tmp_path, rows: list[str]):
    """What Donut's stock SynthDoG writes: images + metadata.jsonl with only the text."""
    train = tmp_path / "synthdog-zh" / "train"
    train.mkdir(parents=True)
    lines = []
    for i, text in enumerate(rows):
        (train / f"image_{i}.jpg").write_bytes(_jpeg((120, 80)))
        gt = json.dumps({"gt_parse": {"text_sequence": text}}, ensure_ascii=False)
        lines.append(json.dumps({"file_name": f"image_{i}.jpg", "ground_truth": gt},
                                ensure_ascii=False))
    (train / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return train / "metadata.jsonl"


def test_synthdog_stock_text_only_is_plain_ocr(tmp_path):
    src = _stock_synthdog(tmp_path, ["第一行  文字\n second   line ", "   ", "only text"])
    m = run_conversion(SynthDoG(str(src), source="synthdog_zh"), tmp_path / "out")
    problems = {p["key"]: p for p in map(json.loads, (
        tmp_path / "out" / "synthdog-problems.jsonl").read_text().splitlines())}
    assert problems["000000001"]["reason"] == "no_regions"  # whitespace only: nothing to read
    expected = plain_ocr_record("synthdog_zh", 120, 80, "第一行 文字\nsecond line")
    assert expected == {"task": "ocr", "source": "synthdog_zh",
                        "images": [{"width": 120, "height": 80}],
                        "text": "第一行 文字\nsecond line"}
    assert m["num_samples"] == 2 and m["skipped"] == {"no_regions": 1}
    got = read_samples(str(tmp_path / "out"))
    assert got["000000000"] == (expected, [_jpeg((120, 80))])
    assert got["000000002"][0]["text"] == "only text"


def test_split_text_prefers_paragraphs_then_words():
    text = "aaaa bbbb\n\ncccc dddd eeee"
    assert split_text(text, 12) == ["aaaa bbbb", "cccc dddd", "eeee"]
    assert split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_text("short", 100) == ["short"]


def test_text_jsonl(tmp_path):
    docs = [{"text": "The first document.", "meta": {"url": "x"}}, {"text": "   "},
            {"text": "para one is here.\n\npara two is here."}, {"title": "no text field"}]
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs))
    m = run_conversion(TextJSONL(str(src), max_chars=20, source="wiki"), tmp_path / "out")
    assert m["skipped"] == {"empty_text": 1, "no_text": 1}
    got = read_samples(str(tmp_path / "out"))
    assert got["000000000_0"] == ({"task": "text", "source": "wiki",
                                   "text": "The first document."}, [])
    assert got["000000002_0"][0]["text"] == "para one is here."
    assert got["000000002_1"][0]["text"] == "para two is here."
    assert m["num_samples"] == 3
