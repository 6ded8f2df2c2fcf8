"""`qwenvl-data inspect`: samples printed as the model sees them."""

from __future__ import annotations

import argparse

from data_fixtures import write_task_shards

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
