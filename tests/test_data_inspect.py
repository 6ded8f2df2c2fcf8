"""`qwenvl-data inspect`: samples printed as the model sees them."""

from __future__ import annotations

import argparse

from data_fixtures import image_bytes, jrec, record, write_raw_tar, write_task_shards

from qwenvl_train.data import inspect as inspect_cmd


def _run(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    inspect_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_inspect_prints_loss_marks_and_collapses_image_slots(tmp_path, capsys):
    write_task_shards(tmp_path, ("grounding", "chat"), per_task=3, per_shard=3)
    code, out = _run(["inspect", str(tmp_path / "grounding-00000.tar"), "--stage",
                      "multitask", "-n", "2"], capsys)
    assert code == 0
    assert "--- grounding00000" in out and "task=grounding (id 2) source=grounding" in out
    assert "images=64x48" in out
    assert ("<img><imgpad>x256</img><ref>thing 0</ref>⟦<box>(0,0),(500,500)</box>"
            "<|endoftext|>⟧") in out
    assert '=== {"ok": 2}' in out


def test_inspect_reports_filtered_samples(tmp_path, capsys):
    write_task_shards(tmp_path, ("chat",), per_task=2, per_shard=2)
    _, out = _run(["inspect", str(tmp_path / "chat-00000.tar"), "--stage", "pretrain"], capsys)
    assert "FILTERED: the pretrain template does not take chat" in out
    _, out = _run(["inspect", str(tmp_path / "chat-00000.tar"), "--stage", "sft",
                   "--num-image-tokens", "64"], capsys)
    assert "Picture 1: <img><imgpad>x64</img>" in out and "⟦It is 0.<|im_end|>⟧" in out


def test_inspect_skips_images_larger_than_max_image_pixels(tmp_path, capsys):
    huge = {**record("caption"), "images": [{"width": 10000, "height": 10000}]}  # 1e8 px
    write_raw_tar(tmp_path / "s.tar", [("huge.json", jrec(huge)), ("huge.0.jpg", image_bytes()),
                                       ("ok.json", jrec(record("caption"))),
                                       ("ok.0.jpg", image_bytes())])
    _, out = _run(["inspect", str(tmp_path / "s.tar"), "--stage", "pretrain"], capsys)
    assert "SKIPPED image_too_large: images[0] is 10000x10000 > 89478485 px" in out
    assert '=== {"image_too_large": 1, "ok": 1}' in out
    _, out = _run(["inspect", str(tmp_path / "s.tar"), "--stage", "pretrain",
                   "--max-image-pixels", str(64 * 48 - 1)], capsys)  # as data.max_image_pixels
    assert '=== {"image_too_large": 2}' in out


def test_draw_skips_an_image_that_does_not_decode(tmp_path, capsys):
    """A truncated JPEG opens (its header is whole) but does not decode: --draw skips the
    sample as the loader skips it (`bad_image`) instead of crashing, and draws the rest."""
    cut = image_bytes()[:1000]  # header whole, coded data cut
    write_raw_tar(tmp_path / "s.tar", [("cut.json", jrec(record("caption"))), ("cut.0.jpg", cut),
                                       ("ok.json", jrec(record("caption"))),
                                       ("ok.0.jpg", image_bytes())])
    code, out = _run(["inspect", str(tmp_path / "s.tar"), "--stage", "pretrain", "--draw",
                      str(tmp_path / "drawn")], capsys)
    assert code == 0
    assert "SKIPPED bad_image: decode failed: image file is truncated" in out
    assert '=== {"bad_image": 1, "ok": 1}' in out
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["ok.png"]
    _, out = _run(["inspect", str(tmp_path / "s.tar"), "--stage", "pretrain"], capsys)
    assert '=== {"ok": 2}' in out  # without --draw no image is decoded


def test_inspect_of_a_missing_shard_is_one_message(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    inspect_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", str(tmp_path / "nope.tar"), "--stage", "sft"])
    code, err = args.func(args), capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'nope.tar'}: no such file" in err
