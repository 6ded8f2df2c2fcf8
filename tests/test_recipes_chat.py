"""Chat converters: the official Qwen-VL fine-tuning JSON and LLaVA instruction JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from data_recipes import run_conversion
from data_recipes.llava import LLaVA
from data_recipes.qwenvl_json import QwenVLJson, parse_value
from data_recipes.wds import read_samples


def _img(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def text(t):
    return {"type": "text", "text": t}


def test_parse_value_images_refs_and_boxes():
    paths: list[str] = []
    parts = parse_value("Picture 1: <img>a.jpg</img>\nPicture 2: <img>b.png</img>\n"
                        "比较<ref>狗</ref><box>(1,2),(3,4)</box><box>(5,6),(1000,8)</box>和"
                        "<box>(10,20),(30,40)</box>", paths)
    assert paths == ["a.jpg", "b.png"]
    assert parts == [
        {"type": "image", "image": 0}, {"type": "image", "image": 1}, text("比较"),
        {"type": "box", "ref": "狗", "boxes_1000": [[1, 2, 3, 4], [5, 6, 999, 8]]},
        text("和"), {"type": "box", "ref": None, "boxes_1000": [[10, 20, 30, 40]]}]


def test_qwenvl_json(tmp_path):
    jpg = _img(tmp_path / "assets" / "dog.jpg", (64, 48))
    png = _img(tmp_path / "assets" / "city.png", (40, 30), "PNG")
    data = [
        {"id": "identity_0", "conversations": [
            {"from": "user", "value": "你好"}, {"from": "assistant", "value": "我是Qwen-VL。"}]},
        {"id": "identity_1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>assets/dog.jpg</img>\n图中的狗是什么品种？"},
            {"from": "assistant", "value": "拉布拉多犬。"},
            {"from": "user", "value": "框出图中的格子衬衫"},
            {"from": "assistant", "value": "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>"}]},
        {"id": "identity_2", "conversations": [
            {"from": "user", "value": "Picture 1: <img>assets/dog.jpg</img>\n"
                                      "Picture 2: <img>assets/city.png</img>\n图中都是哪"},
            {"from": "assistant", "value": "第一张是狗，第二张是城市。"}]},
        {"id": "identity_3", "conversations": [
            {"from": "user", "value": "Picture 1: <img>assets/nope.jpg</img>\nHi"},
            {"from": "assistant", "value": "Hello"}]},
    ]
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data, ensure_ascii=False))
    m = run_conversion(QwenVLJson(str(src)), tmp_path / "out")
    assert m["num_samples"] == 3 and m["skipped"] == {"missing_image": 1}
    got = read_samples(str(tmp_path / "out"))
    rec0, ims0 = got["000000000"]
    assert rec0 == {"task": "chat", "source": "qwenvl_sft", "images": [], "messages": [
        {"role": "user", "content": [text("你好")]},
        {"role": "assistant", "content": [text("我是Qwen-VL。")]}]} and ims0 == []
    rec1, ims1 = got["000000001"]
    assert rec1["images"] == [{"width": 64, "height": 48}] and ims1 == [jpg]
    assert rec1["messages"][0]["content"] == [{"type": "image", "image": 0},
                                              text("图中的狗是什么品种？")]
    assert rec1["messages"][3]["content"] == [
        {"type": "box", "ref": "格子衬衫", "boxes_1000": [[588, 499, 725, 789]]}]
    rec2, ims2 = got["000000002"]
    assert rec2["images"] == [{"width": 64, "height": 48}, {"width": 40, "height": 30}]
    assert ims2 == [jpg, png]
    assert [p["type"] for p in rec2["messages"][0]["content"]] == ["image", "image", "text"]


def test_llava(tmp_path):
    _img(tmp_path / "coco" / "train2017" / "000000033471.jpg", (64, 48))
    _img(tmp_path / "coco" / "train2017" / "000000000002.jpg", (32, 32))
    data = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "An advertisement."}]},
        {"id": "text_only", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "no_placeholder", "image": "coco/train2017/000000000002.jpg", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A square."}]},
        {"id": "two", "image": ["coco/train2017/000000033471.jpg",
                                "coco/train2017/000000000002.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare."},
            {"from": "gpt", "value": "Different."}]},
        {"id": "bad", "image": "coco/train2017/000000000002.jpg", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "No"}]},
        {"id": "weird", "conversations": ["a turn that is not an object"]},
    ]
    src = tmp_path / "llava_v1_5_mix665k.json"
    src.write_text(json.dumps(data))
    m = run_conversion(LLaVA(str(src)), tmp_path / "out", workers=1)
    assert m["num_samples"] == 4
    assert m["skipped"] == {"image_count_mismatch": 1, "malformed_item": 1}
    got = read_samples(str(tmp_path / "out"))
    rec, ims = got["000000000"]
    assert rec["source"] == "llava" and rec["images"] == [{"width": 64, "height": 48}]
    assert rec["messages"][0] == {"role": "user", "content": [
        {"type": "image", "image": 0}, text("What are the colors of the bus in the image?")]}
    assert rec["messages"][1] == {"role": "assistant",
                                  "content": [text("The bus in the image is white and red.")]}
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    assert got["000000001"][0]["images"] == [] and got["000000001"][1] == []
    first = got["000000002"][0]["messages"][0]["content"]
    assert first == [{"type": "image", "image": 0}, text("Describe it.")]
    two = got["000000003"][0]
    assert two["messages"][0]["content"] == [{"type": "image", "image": 0},
                                             {"type": "image", "image": 1}, text("Compare.")]
    assert len(got["000000003"][1]) == 2
