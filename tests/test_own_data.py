"""Own data on the command line (`data=shards data.shards=[...]`) and the data checks that
run before anything is built."""

from __future__ import annotations

import pytest
from data_fixtures import write_task_shards

from qwenvl_train.config import ConfigError, load_config, validate_launch
from qwenvl_train.data.config import SourceConfig, parse_shards_entry
from qwenvl_train.data.loader import build_loader, resolve_sources
from qwenvl_train.data.tokenizer import get_tokenizer


@pytest.mark.parametrize("entry, pattern, weight", [
    ("/data/a/*.tar", "/data/a/*.tar", 1.0),
    ("/data/b/{000..099}.tar:0.5", "/data/b/{000..099}.tar", 0.5),
    ("rel/dir/*.tar:3", "rel/dir/*.tar", 3.0),
    ("/data/a:b/*.tar", "/data/a:b/*.tar", 1.0),       # not a number: part of the path
    ("/data/x:2:1", "/data/x:2", 1.0),                  # a path ending in :2, weight 1
    ("/a/*.tar /b/*.tar:2", "/a/*.tar /b/*.tar", 2.0),  # several patterns, one source
])
def test_shards_entry_is_a_pattern_with_an_optional_weight(entry, pattern, weight):
    assert parse_shards_entry(entry) == SourceConfig(pattern, weight)


@pytest.mark.parametrize("entry", ["/data/a/*.tar:0", "/data/a/*.tar:-1", "/d/*.tar:nan", ":2"])
def test_bad_shards_entries_name_the_entry(entry):
    with pytest.raises(ConfigError, match=r"data\.shards\[0\]"):
        load_config(["data=shards", f"data.shards=[{entry!r}]"])


def test_data_shards_is_required_with_data_shards():
    with pytest.raises(ConfigError, match=r"data\.shards: data=shards trains on the shards"):
        load_config(["data=shards"])


def test_one_message_lists_every_source_that_matches_nothing(tmp_path):
    write_task_shards(tmp_path / "chat" / "llava", ("chat",), per_task=2, per_shard=2)
    cfg = load_config(["data=sft_chat", f"data.root={tmp_path}", "scale=demo",
                       f"data.shards=[{tmp_path}/chat/llava/*.tar:2,/nowhere/*.tar,mine/*.tar]"])
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, world_size=1)
    msg = str(err.value)
    assert msg.startswith(f"data: 3 of 5 data source(s) match no .tar file (relative patterns "
                          f"start at data.root='{tmp_path}'):\n")
    for line in ("data.sources.qwenvl_sft.shards: 'chat/qwenvl/*.tar'",
                 "data.shards[1]: '/nowhere/*.tar'", "data.shards[2]: 'mine/*.tar'"):
        assert f"\n  {line}\n" in msg
    assert "llava" not in msg and "data.shards[0]" not in msg


def test_an_unset_data_variable_is_named_with_the_fix(monkeypatch):
    monkeypatch.delenv("QWENVL_DATA", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(["data=sft_chat"])
    assert str(err.value) == ("data.root: the environment variable QWENVL_DATA is not set; "
                              "`export QWENVL_DATA=/path/...`, or pass data.root=/path/... on "
                              "the command line")


def test_command_line_shards_feed_the_loader_with_their_weights(tmp_path):
    """Absolute and relative patterns, weights; the manifests beside shards outside
    data.root still drop a source the stage cannot use."""
    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    write_task_shards(inside, ("caption",), per_task=4, per_shard=2)
    write_task_shards(outside, ("vqa", "chat"), per_task=4, per_shard=2)
    cfg = load_config(["data=shards", f"data.root={inside}", "data.virtual_streams=2",
                       "data.shards=["
                       f"caption-*.tar,{outside}/vqa-*.tar:0.5,{outside}/chat-*.tar:2]"]).data
    assert resolve_sources(cfg, "multitask") == [
        ("shards0", ["caption-00000.tar", "caption-00001.tar"], 1.0),
        ("shards1", [f"{outside}/vqa-00000.tar", f"{outside}/vqa-00001.tar"], 0.5),
    ]  # chat is not a multitask task: its source is dropped (its manifest says so)
    loader = build_loader(cfg, get_tokenizer(), template="multitask", image_size=28,
                          seq_len=64, pack=False, num_image_tokens=4, dp_rank=0, dp_size=1,
                          micro_batch_size=2, seed=0, num_workers=0)
    it = iter(loader)
    keys = {k for _ in range(6) for k in next(it)["keys"]}
    assert any(k.startswith("vqa") for k in keys) and any(k.startswith("caption") for k in keys)


def test_a_wrong_glob_stops_the_cli_before_anything_is_built(probe_cli, tmp_path):
    proc, heavy = probe_cli("qwenvl_train.cli.train", [
        "data=shards", f"data.shards=[{tmp_path}/nothing/*.tar]", f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2 and heavy == []
    assert f"data.shards[0]: '{tmp_path}/nothing/*.tar'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_too_few_samples_for_the_virtual_streams_stop_the_cli(probe_cli, tmp_path):
    """4 vqa samples cannot feed 64 virtual streams: refused at launch, naming the fix."""
    write_task_shards(tmp_path / "d", ("vqa",), per_task=4, per_shard=2)
    proc, heavy = probe_cli("qwenvl_train.cli.train", [
        "stage=multitask", "data=shards", f"data.shards=[{tmp_path}/d/vqa-*.tar]",
        f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2 and heavy == [], proc.stderr[-2000:]
    assert "data.virtual_streams=64: source(s) 'shards0' (4)" in proc.stderr
    assert "set data.virtual_streams to at most 4" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_data_config_file_of_your_own_via_config_dir(probe_cli, tmp_path):
    """README's worked example: my_configs/data/my_chat.yaml, chosen with --config-dir."""
    (tmp_path / "my_configs" / "data").mkdir(parents=True)
    (tmp_path / "my_configs" / "data" / "my_chat.yaml").write_text(
        "name: my_chat\n"
        f"root: {tmp_path / 'data'}\n"
        "sources:\n"
        '  llava: {shards: "chat/llava/*.tar", weight: 1.0}\n'
        '  my_dialogues: {shards: "chat/mine/{000..099}.tar", weight: 0.5}\n'
        "num_workers: 4\n")
    write_task_shards(tmp_path / "data" / "chat" / "llava", ("chat",), per_task=2, per_shard=2)
    proc, heavy = probe_cli("qwenvl_train.cli.train", [
        "--config-dir", str(tmp_path / "my_configs"), "stage=sft", "data=my_chat",
        f"run_dir={tmp_path}/run"])
    assert proc.returncode == 2 and heavy == []
    assert proc.stderr == (
        "qwenvl-train: invalid config: data: 1 of 2 data source(s) match no .tar file "
        f"(relative patterns start at data.root='{tmp_path / 'data'}'):\n"
        "  data.sources.my_dialogues.shards: 'chat/mine/{000..099}.tar'\n"
        "Fix the path, drop a source you do not have (~data.sources.NAME), or train on just "
        "your shards: data=shards data.shards='[/path/a/*.tar,/path/b/*.tar:0.5]'\n")


def test_config_loader_workers_are_capped_at_the_cpus_of_the_process(tmp_path, monkeypatch,
                                                                      caplog):
    import os

    write_task_shards(tmp_path, ("caption",), per_task=4, per_shard=2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    data = load_config(["data=shards", f"data.root={tmp_path}", "data.shards=[caption-*.tar]",
                        "data.num_workers=8"]).data
    kwargs = dict(template="pretrain", image_size=28, seq_len=512, pack=False,
                  num_image_tokens=4, dp_rank=0, dp_size=1, micro_batch_size=1, seed=0)
    with caplog.at_level("INFO", logger="qwenvl_train.data"):
        capped = build_loader(data, get_tokenizer(), **kwargs)
    assert capped.spec.num_workers == 2
    assert "8 loader workers asked for (data.num_workers), 2 CPU(s) available" in caplog.text
    explicit = build_loader(data, get_tokenizer(), num_workers=3, **kwargs)  # as given
    assert explicit.spec.num_workers == 3
