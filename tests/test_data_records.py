"""`read_record`: one way from a tar entry to a typed sample, shared by the training stream,
`qwenvl-data inspect` and evaluation, so all three drop the same records for the same
reasons."""

from __future__ import annotations

import pytest
from data_fixtures import jrec, record, write_defect_shards, write_raw_tar

from qwenvl_train.data.config import DataConfig, SourceConfig
from qwenvl_train.data.inspect import inspect_shard
from qwenvl_train.data.loader import build_loader
from qwenvl_train.data.reader import Entry, ShardFile, index_tar
from qwenvl_train.data.records import read_record
from qwenvl_train.data.schema import SampleError
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.eval.run_eval import iter_items

LIMIT = 200 * 200  # the defect set's "huge" record declares 300x300


def test_inspect_and_eval_skip_what_the_loader_skips(tmp_path):
    write_defect_shards(tmp_path)
    shard = str(tmp_path / "b-defects.tar")
    data = DataConfig(root=str(tmp_path), sources={"b": SourceConfig("b-defects.tar")},
                      shuffle=False, max_image_pixels=LIMIT, virtual_streams=1)
    loader = build_loader(data, get_tokenizer(), template="multitask", image_size=16,
                          seq_len=96, pack=False, num_image_tokens=4, dp_rank=0, dp_size=1,
                          micro_batch_size=1, seed=0, num_workers=0)
    assert next(iter(loader))["keys"] == ["good4"]  # one pass over the shard
    skipped = loader.stats()["skipped"]
    assert skipped == {"bad_image": 1, "bad_json": 1, "missing_image": 1, "image_too_large": 1,
                       "box_outside_image": 1, "too_long": 1, "bad_record": 1}

    counts = inspect_shard(shard, "multitask", 100, 4, 96, out=lambda _: None,
                           max_image_pixels=LIMIT)
    # inspect does not decode images, so the broken JPEG prints as the model would see it
    assert counts == {**{r: 1 for r in skipped if r != "bad_image"}, "ok": 2}

    eval_counts: dict[str, int] = {}
    items = list(iter_items([shard], "caption", eval_counts, max_image_pixels=LIMIT))
    assert [it.key for it in items] == ["badjpeg", "good4"]  # decoded later, in evaluate
    # the grounding and VQA records are not caption records: not read, not counted
    assert eval_counts == {"bad_json": 1, "missing_image": 1, "image_too_large": 1,
                           "bad_record": 1}


class CountingShard(ShardFile):
    def __init__(self, path):
        super().__init__(path)
        self.reads: list[tuple[int, int]] = []

    def read(self, loc):
        self.reads.append(loc)
        return super().read(loc)


def test_filtered_task_is_decided_from_the_json_alone(tmp_path):
    path = tmp_path / "s.tar"
    # a chat record whose image member is missing: the filter comes before validation
    write_raw_tar(path, [("k.json", jrec(record("chat")))])
    entry = index_tar(path).entries[0]
    shard = CountingShard(path)
    try:
        assert read_record(entry, shard, max_image_pixels=None, tasks={"caption"}) is None
        assert shard.reads == [entry.members["json"]]
        with pytest.raises(SampleError) as e:
            read_record(entry, shard, max_image_pixels=None, tasks={"chat"})
        assert e.value.reason == "missing_image"
    finally:
        shard.close()


def test_record_carries_its_image_bytes_and_raw_json(tmp_path):
    path = tmp_path / "s.tar"
    rec = {**record("caption"), "captions": ["a", "b"]}  # a field beyond the schema
    write_raw_tar(path, [("k.json", jrec(rec)), ("k.0.jpg", b"jpeg bytes")])
    shard = ShardFile(path)
    try:
        got = read_record(index_tar(path).entries[0], shard, max_image_pixels=None)
    finally:
        shard.close()
    assert got.sample.images == [b"jpeg bytes"] and got.raw == rec
    assert got.sample.caption == rec["caption"]


def test_unreadable_member_is_bad_tar(tmp_path):
    path = tmp_path / "s.tar"
    write_raw_tar(path, [("k.json", jrec(record("caption")))])
    shard = ShardFile(path)
    try:
        with pytest.raises(SampleError) as e:  # a member that ends past the file
            read_record(Entry("k", {"json": (512, 1 << 20)}), shard, max_image_pixels=None)
    finally:
        shard.close()
    assert e.value.reason == "bad_tar" and "short read" in e.value.msg
