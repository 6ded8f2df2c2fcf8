"""The conversion runner (units, workers, resume, manifest), the streaming JSON reader and
the `convert` command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import data_recipes.jsonstream as js
from data_recipes import run_conversion
from data_recipes.cli import main
from data_recipes.text import TextJSONL
from data_recipes.wds import read_samples


class FlakyText(TextJSONL):
    """Dies on document 25 while the flag file exists: an interrupted conversion."""

    def __init__(self, src: str, flag: str):
        super().__init__(src)
        self.flag = flag

    def convert(self, item):
        if item[0] == 25 and Path(self.flag).exists():
            raise RuntimeError("killed")
        return super().convert(item)


def _corpus(tmp_path: Path, n: int = 40) -> str:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}. " * (i % 5 + 1)}) + "\n"
                           for i in range(n)))
    return str(src)


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    src = _corpus(tmp_path)
    flag = tmp_path / "fail"
    flag.write_text("1")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        run_conversion(FlakyText(src, str(flag)), out, max_samples=4)
    done = sorted(p.name for p in (out / ".text-progress").glob("unit-*.json"))
    assert done == [f"unit-{i:05d}.json" for i in range(6)]  # unit 6 holds document 25
    assert (out / "text-00006-00000.tar").exists()  # its partial shard
    assert not (out / "text-manifest.json").exists()
    flag.unlink()
    m = run_conversion(FlakyText(src, str(flag)), out, max_samples=4)
    ref = tmp_path / "ref"
    m_ref = run_conversion(FlakyText(src, str(flag)), ref, max_samples=4)
    assert _digest(out) == _digest(ref) and len(_digest(out)) == 10
    assert m == m_ref and m["num_samples"] == 40 and m["units"] == 10
    assert [s["name"] for s in m["shards"]] == [f"text-{i:05d}-00000.tar" for i in range(10)]
    assert [s["samples"] for s in m["shards"]] == [4] * 10
    assert json.loads((out / "text-manifest.json").read_text()) == m
    assert not list(out.glob("text-0000?-manifest.json"))  # folded into the merged one


def test_workers_give_the_same_bytes(tmp_path):
    src = _corpus(tmp_path, 35)
    a = run_conversion(FlakyText(src, "/nonexistent"), tmp_path / "a", max_samples=8)
    b = run_conversion(FlakyText(src, "/nonexistent"), tmp_path / "b", max_samples=8,
                       workers=2)
    assert a == b and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(read_samples(str(tmp_path / "b"))) == 35


def test_other_settings_in_the_same_out_dir_are_refused(tmp_path):
    src = _corpus(tmp_path, 5)
    run_conversion(TextJSONL(src), tmp_path / "out")
    with pytest.raises(ValueError, match="other settings"):
        run_conversion(TextJSONL(src, max_chars=10), tmp_path / "out")
    run_conversion(TextJSONL(src, max_chars=10), tmp_path / "out", prefix="short")  # new prefix


def test_cli_convert_and_errors(tmp_path, capsys):
    src = _corpus(tmp_path, 6)
    rc = main(["convert", "text", "--src", src, "--out", str(tmp_path / "out"),
               "--max-chars", "30", "--source", "web", "--max-samples-per-shard", "4",
               "--workers", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"] == {"text": summary["num_samples"]} and summary["num_samples"] > 6
    assert {r[0]["source"] for r in read_samples(str(tmp_path / "out")).values()} == {"web"}
    with pytest.raises(SystemExit):  # option values are checked by the parser
        main(["convert", "vqav2", "--src", src, "--out", str(tmp_path / "bad"),
              "--answer", "nonsense"])
    assert "most_common" in capsys.readouterr().err
    rc = main(["convert", "vqav2", "--src", str(tmp_path / "nope.json"), "--out",
               str(tmp_path / "bad")])
    assert rc == 2 and "nope.json" in capsys.readouterr().err


def test_iter_array_with_tiny_buffers(tmp_path, monkeypatch):
    obj = {"info": {"a": [1, {"b": "x]},{"}]}, "data_subtype": "train2014",
           "questions": [{"q": 'say "hi" ]', "n": 123456789, "f": -1.5e-3, "u": "中文",
                          "t": True, "z": None} for _ in range(50)],
           "annotations": [[1, 2], [], 1234567, 0.25]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1))
    for chunk in (1, 3, 7):
        monkeypatch.setattr(js, "_CHUNK", chunk)
        monkeypatch.setattr(js._Reader.__init__, "__defaults__", (chunk,))
        assert list(js.iter_array(path, "questions")) == obj["questions"]
        assert list(js.iter_array(path, "annotations")) == obj["annotations"]
        assert js.top_level_scalars(path) == {"data_subtype": "train2014"}
    (tmp_path / "o.json").write_text(json.dumps({"1": {"x": 1}, "2": [2]}))
    assert list(js.iter_object(tmp_path / "o.json")) == [("1", {"x": 1}), ("2", [2])]
    assert list(js.iter_records(tmp_path / "o.json")) == [{"x": 1}, [2]]
    with pytest.raises(KeyError):
        list(js.iter_array(path, "nope"))


def test_changed_input_is_converted_again(tmp_path, caplog):
    src = Path(_corpus(tmp_path, 12))
    out = tmp_path / "out"
    run_conversion(TextJSONL(str(src)), out, max_samples=4)
    # New contents: the rerun must not keep the shards of the old ones.
    src.write_text("".join(json.dumps({"text": f"changed {i}"}) + "\n" for i in range(6)))
    with caplog.at_level("INFO", logger="data_recipes.runner"):
        m = run_conversion(TextJSONL(str(src)), out, max_samples=4)
    assert "input changed since it was converted" in caplog.text and str(src) in caplog.text
    ref = run_conversion(TextJSONL(str(src)), tmp_path / "ref", max_samples=4)
    assert _digest(out) == _digest(tmp_path / "ref") and len(_digest(out)) == 2
    assert m == ref and m["num_samples"] == 6
    assert sorted(p.name for p in (out / ".text-progress").glob("unit-*")) == [
        "unit-00000-problems.jsonl", "unit-00000.json", "unit-00001-problems.jsonl",
        "unit-00001.json"]  # units 2 (gone from the source) removed with their shards
    assert {r[0]["text"] for r in read_samples(str(out)).values()} == {
        f"changed {i}" for i in range(6)}


def _wds_tar(path: Path, keys: list[str]) -> None:
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for key in keys:
            buf = io.BytesIO()
            Image.new("RGB", (80, 80), (len(key), 9, 9)).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_only_the_units_of_a_changed_tar_are_redone(tmp_path):
    from data_recipes.img2dataset import Img2Dataset

    src = tmp_path / "wds"
    src.mkdir()
    _wds_tar(src / "00000.tar", ["a", "b"])
    _wds_tar(src / "00001.tar", ["c"])
    out = tmp_path / "out"
    run_conversion(Img2Dataset(str(src)), out)
    first = (out / "img2dataset-00000-00000.tar").stat().st_mtime_ns
    _wds_tar(src / "00001.tar", ["c", "d"])
    m = run_conversion(Img2Dataset(str(src)), out)
    assert (out / "img2dataset-00000-00000.tar").stat().st_mtime_ns == first  # untouched
    assert m["num_samples"] == 4 and sorted(read_samples(str(out))) == ["a", "b", "c", "d"]
    (src / "00001.tar").unlink()
    m = run_conversion(Img2Dataset(str(src)), out)
    assert m["num_samples"] == 2 and sorted(p.name for p in out.glob("*.tar")) == [
        "img2dataset-00000-00000.tar"]


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run_conversion(TextJSONL(str(tmp_path / "nope.jsonl")), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"no input files"):
        run_conversion(TextJSONL(str(tmp_path / "*.jsonl")), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written

