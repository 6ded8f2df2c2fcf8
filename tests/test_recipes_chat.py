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
    rec0, ims0 = got["000000000_identity_0"]
    assert rec0 == {"task": "chat", "source": "qwenvl_sft", "images": [], "messages": [
        {"role": "user", "content": [text("你好")]},
        {"role": "assistant", "content": [text("我是Qwen-VL。")]}]} and ims0 == []
    rec1, ims1 = got["000000001_identity_1"]
    assert rec1["images"] == [{"width": 64, "height": 48}] and ims1 == [jpg]
    assert rec1["messages"][0]["content"] == [{"type": "image", "image": 0},
                                              text("图中的狗是什么品种？")]
    assert rec1["messages"][3]["content"] == [
        {"type": "box", "ref": "格子衬衫", "boxes_1000": [[588, 499, 725, 789]]}]
    rec2, ims2 = got["000000002_identity_2"]
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
    rec, ims = got["000000000_000000033471"]
    assert rec["source"] == "llava" and rec["images"] == [{"width": 64, "height": 48}]
    assert rec["messages"][0] == {"role": "user", "content": [
        {"type": "image", "image": 0}, text("What are the colors of the bus in the image?")]}
    assert rec["messages"][1] == {"role": "assistant",
                                  "content": [text("The bus in the image is white and red.")]}
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 2
    assert got["000000001_text_only"][0]["images"] == [] and got["000000001_text_only"][1] == []
    first = got["000000002_no_placeholder"][0]["messages"][0]["content"]
    assert first == [{"type": "image", "image": 0}, text("Describe it.")]
    two = got["000000003_two"][0]
    assert two["messages"][0]["content"] == [{"type": "image", "image": 0},
                                             {"type": "image", "image": 1}, text("Compare.")]
    assert len(got["000000003_two"][1]) == 2


def _llava_boxes_data(tmp_path: Path) -> Path:
    _img(tmp_path / "vg" / "1.jpg", (200, 100))
    _img(tmp_path / "vg" / "2.jpg", (50, 50))
    data = [
        {"id": "vg/1", "image": "vg/1.jpg", "conversations": [
            {"from": "human", "value": "Where is the dog?\n<image>"},
            {"from": "gpt", "value": "Here: <ref>the dog</ref><box>(100,200),(500,700)</box>."},
            {"from": "human", "value": "Describe this region: [0.25, 0.25, 0.75, 0.75]"},
            {"from": "gpt", "value": "[0.0, 0.25, 0.5, 0.75]"},
            {"from": "human", "value": "And [1, 2, 3]? [0.5, 0.5, 0.5, 0.6]"},
            {"from": "gpt", "value": "Lists."}]},
        {"id": "two.images", "image": ["vg/1.jpg", "vg/2.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nBox [0.1, 0.1, 0.2, 0.2]?"},
            {"from": "gpt", "value": "Yes."}]},
        {"id": "broken", "image": "vg/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "No"}]},
    ]
    src = tmp_path / "mix.json"
    src.write_text(json.dumps(data))
    return src


def _rendered_turns(sample) -> tuple[list[str], list[str]]:
    """User and assistant turns of a converted chat sample as the sft template writes them
    (image slots shown as an empty `<img></img>`)."""
    from qwenvl_train.data.records import parse_record
    from qwenvl_train.data.templates import ImageSlot, Special, render

    rec, images = sample
    text_ = "".join("<img></img>" if isinstance(seg, ImageSlot) else
                    seg.token if isinstance(seg, Special) else seg
                    for seg, _ in render(parse_record(rec, "k", set(range(len(images)))), "sft"))
    turns = text_.split("<|im_start|>")[2:]  # after the system turn
    user = [t.removeprefix("user\n").removesuffix("<|im_end|>\n") for t in turns
            if t.startswith("user")]
    assistant = [t.removeprefix("assistant\n").removesuffix("<|im_end|>\n") for t in turns
                 if t.startswith("assistant")]
    return user, assistant


def test_llava_boxes_in_the_text_become_box_parts(tmp_path):
    src = _llava_boxes_data(tmp_path)
    m = run_conversion(LLaVA(str(src)), tmp_path / "off")
    assert m["num_samples"] == 2 and m["skipped"] == {"image_count_mismatch": 1}
    assert m["problem_examples"] == {"image_count_mismatch": ["000000002_broken"]}
    got = read_samples(str(tmp_path / "off"))
    assert sorted(got) == ["000000000_vg_1", "000000001_two_images"]  # source ids as keys
    msgs = got["000000000_vg_1"][0]["messages"]
    # The newline before the placeholder stays: "Where is the dog?\nPicture 1: <img>..."
    assert msgs[0]["content"] == [text("Where is the dog?\n"), {"type": "image", "image": 0}]
    assert msgs[1]["content"] == [  # Qwen-VL markup is always parsed
        text("Here: "), {"type": "box", "ref": "the dog", "boxes_1000": [[100, 200, 500, 700]]},
        text(".")]
    assert msgs[3]["content"] == [text("[0.0, 0.25, 0.5, 0.75]")]  # lists only when asked

    # 200x100: as fractions of the image, or of the 200x200 square it was centred in
    # (LLaVA-1.5's expand2square: 50 px of padding above and below).
    expected = {"image": ([50.0, 25.0, 150.0, 75.0], [0.0, 25.0, 100.0, 75.0]),
                "padded": ([50.0, 0.0, 150.0, 100.0], [0.0, 0.0, 100.0, 100.0])}
    for convention, (region, answer) in expected.items():
        out = tmp_path / convention
        m = run_conversion(LLaVA(str(src), list_boxes=convention), out)
        assert m["kept_with_problems"] == {"list_box_kept_as_text": 1}
        msgs = read_samples(str(out))["000000000_vg_1"][0]["messages"]
        assert msgs[2]["content"] == [
            text("Describe this region: "),
            {"type": "box", "ref": None, "image": 0, "boxes": [region]}]
        assert msgs[3]["content"] == [{"type": "box", "ref": None, "image": 0,
                                       "boxes": [answer]}]
        if convention == "padded":  # as the sft template renders it
            user, answer_text = _rendered_turns(read_samples(str(out))["000000000_vg_1"])
            assert user[0] == "Where is the dog?\nPicture 1: <img></img>\n"
            assert user[1] == "Describe this region: <box>(250,0),(750,999)</box>"
            assert answer_text[:2] == ["Here: <ref>the dog</ref><box>(100,200),(500,700)</box>.",
                                       "<box>(0,0),(500,999)</box>"]
        # not boxes: three numbers; a zero-width list
        assert msgs[4]["content"] == [text("And [1, 2, 3]? [0.5, 0.5, 0.5, 0.6]")]
        two = read_samples(str(out))["000000001_two_images"][0]["messages"][0]["content"]
        assert two[-1] == text("Box [0.1, 0.1, 0.2, 0.2]?")  # which image? stays text


def test_llava_cli_list_boxes_option_and_unknown_value(tmp_path, capsys):
    from data_recipes.cli import main

    src = _llava_boxes_data(tmp_path)
    rc = main(["convert", "llava", "--src", str(src), "--out", str(tmp_path / "out"),
               "--list-boxes", "padded"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["num_samples"] == 2
    rec = read_samples(str(tmp_path / "out"))["000000000_vg_1"][0]
    assert rec["messages"][3]["content"][0]["boxes"] == [[0.0, 0.0, 100.0, 100.0]]
    try:
        main(["convert", "llava", "--src", str(src), "--out", str(tmp_path / "x"),
              "--list-boxes", "pixels"])
    except SystemExit:
        pass
    assert "padded" in capsys.readouterr().err


def test_llava_box_outside_the_image_is_named(tmp_path):
    _img(tmp_path / "wide.jpg", (200, 100))
    data = [{"id": "a", "image": "wide.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhere?"},
        {"from": "gpt", "value": "[0.1, 0.0, 0.2, 0.2]"}]}]  # in the top padding band
    (tmp_path / "a.json").write_text(json.dumps(data))
    m = run_conversion(LLaVA(str(tmp_path / "a.json"), list_boxes="padded"), tmp_path / "out")
    assert m["skipped"] == {"box_outside_image": 1}
    [p] = map(json.loads, (tmp_path / "out" / "llava-problems.jsonl").read_text().splitlines())
    assert p["key"] == "000000000_a" and "200x100" in p["detail"]


def test_readme_llava_example_works_as_written(tmp_path):
    """The worked example of data_recipes/README.md, its bash blocks run as they stand
    (`qwenvl-data` and `python` are this interpreter), prints and writes what it says."""
    import os
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "data_recipes" / "README.md").read_text()
    section = readme.split("### Worked example: my LLaVA JSON -> shards")[1].split("\n## ")[0]
    script = "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("qwenvl-data", "-m qwenvl_train.cli.data"), ("python", "")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(["bash", "-euc", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"num_samples": 2' in proc.stdout and '"missing_image": 1' in proc.stdout
    assert "Picture 1: <img>" in proc.stdout and "<box>(0,0),(999,999)</box>" in proc.stdout
    assert '"key": "000000002_fox-2"' in proc.stdout
