"""The loader: exact resume (workers, ranks), splitting, blending, epochs, corrupt data."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_defect_shards, write_raw_tar, write_task_shards

from qwenvl_train.data.config import DataConfig, SourceConfig
from qwenvl_train.data.loader import DataError, build_loader
from qwenvl_train.data.schema import TASKS
from qwenvl_train.data.sources import Blender
from qwenvl_train.data.tokenizer import get_tokenizer

STAGES = {
    "pretrain": {"template": "pretrain", "image_size": 16, "seq_len": 64, "pack": False},
    "multitask": {"template": "multitask", "image_size": 16, "seq_len": 96, "pack": True},
    "sft": {"template": "sft", "image_size": 16, "seq_len": 96, "pack": False},
    "multitask_unpacked": {"template": "multitask", "image_size": 16, "seq_len": 96,
                           "pack": False},
}


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_task_shards(root, TASKS, per_task=24, per_shard=6)  # 4 shards per task
    return root


def _loader(root, stage="multitask", *, rank=0, dp=1, workers=0, mb=2, seed=7, sources=None,
            virtual_streams=4, global_batch_size=None, **cfg):
    sources = sources or {t: SourceConfig(f"{t}-*.tar") for t in TASKS}
    data = DataConfig(root=str(root), sources=sources, virtual_streams=virtual_streams, **cfg)
    return build_loader(data, get_tokenizer(), **STAGES[stage], num_image_tokens=4,
                        dp_rank=rank, dp_size=dp, micro_batch_size=mb, seed=seed,
                        num_workers=workers, global_batch_size=global_batch_size)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _sig(batch):
    return batch["keys"], batch["input_ids"].tolist(), float(batch["images"].sum())


@pytest.mark.parametrize("stage,workers", [("multitask", 2), ("multitask", 0),
                                           ("pretrain", 2), ("sft", 1)])
def test_exact_resume_two_ranks(shard_root, stage, workers):
    n, k = 5, 6
    for rank in (0, 1):
        ref = [_sig(b) for b in _take(_loader(shard_root, stage, rank=rank, dp=2,
                                              workers=workers), n + k)]
        first = _loader(shard_root, stage, rank=rank, dp=2, workers=workers)
        got = [_sig(b) for b in _take(first, n)]
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
        resumed = _loader(shard_root, stage, rank=rank, dp=2, workers=workers)
        resumed.load_state_dict(state)
        got += [_sig(b) for b in _take(resumed, k)]
        assert got == ref, f"rank {rank}"
        assert resumed.stats()["batches"] == n + k


def test_resume_across_zero_and_one_worker(shard_root):
    ref = [_sig(b) for b in _take(_loader(shard_root, workers=1), 6)]
    first = _loader(shard_root, workers=0)
    got = [_sig(b) for b in _take(first, 3)]
    resumed = _loader(shard_root, workers=1)
    resumed.load_state_dict(first.state_dict())
    assert got + [_sig(b) for b in _take(resumed, 3)] == ref


def _global_steps(loaders, steps, mb=2):
    """Per step: every rank's micro-batches (in-process ranks, no exchange), in global
    order, as (micro-batch index, keys, token ids)."""
    its = [iter(ld) for ld in loaders]
    per_rank = loaders[0].spec.micro_per_step // len(loaders)
    out = []
    for _ in range(steps):
        step = [next(it) for it in its for _ in range(per_rank)]
        out.append(sorted((b["micro_batch"], *_sig(b)[:2]) for b in step))
    return out


def _merged_state(loaders):
    """What the exchange's gather makes of the ranks' states: every virtual stream."""
    state = json.loads(json.dumps(loaders[0].state_dict()))
    for ld in loaders[1:]:
        state["streams"].update(json.loads(json.dumps(ld.state_dict()["streams"])))
    return state


def test_global_batches_do_not_depend_on_the_layout_and_resume_across_it(shard_root):
    """dp=2 x 2 workers saves; dp=1 x 0 and dp=4 x 1 workers resume: the global batches
    (same keys, same packing, same order) are those of one uninterrupted dp=1 run."""
    args = dict(stage="multitask", mb=2, global_batch_size=8)  # 4 micro-batches per step
    ref = _global_steps([_loader(shard_root, workers=2, **args)], 7)
    first = [_loader(shard_root, rank=r, dp=2, workers=2, **args) for r in (0, 1)]
    assert _global_steps(first, 3) == ref[:3]
    state = _merged_state(first)
    for dp, workers in ((1, 0), (4, 1)):
        resumed = [_loader(shard_root, rank=r, dp=dp, workers=workers, **args)
                   for r in range(dp)]
        for ld in resumed:
            ld.load_state_dict(state)
        assert _global_steps(resumed, 4) == ref[3:], (dp, workers)


def test_resume_refuses_another_order_or_a_partial_state(shard_root):
    first = [_loader(shard_root, rank=r, dp=2, global_batch_size=4) for r in (0, 1)]
    _global_steps(first, 3)
    with pytest.raises(DataError, match="virtual_streams"):
        _loader(shard_root, virtual_streams=8, global_batch_size=4).load_state_dict(
            _merged_state(first))
    with pytest.raises(DataError, match="micro_per_step"):  # another global batch
        _loader(shard_root, global_batch_size=8).load_state_dict(_merged_state(first))
    with pytest.raises(DataError, match="seed"):
        _loader(shard_root, dp=2, seed=8, global_batch_size=4).load_state_dict(
            first[0].state_dict())
    with pytest.raises(DataError, match=r"lacks virtual stream\(s\) \[1, 3\]"):
        _loader(shard_root, global_batch_size=4).load_state_dict(
            first[0].state_dict())  # rank 0's streams only


def test_resume_skips_shards_without_reading(shard_root, monkeypatch):
    first = _loader(shard_root, "pretrain", mb=1)
    _take(first, 9)  # into the second caption shard
    state = first.state_dict()
    import qwenvl_train.data.sources as sources

    opened = []
    real = sources.index_tar
    monkeypatch.setattr(sources, "index_tar", lambda p: opened.append(p) or real(p))
    resumed = _loader(shard_root, "pretrain", mb=1)
    resumed.load_state_dict(state)
    _take(resumed, 1)
    assert len(opened) == 1  # only the shard it resumes in


def test_streams_split_shards_disjointly(shard_root):
    keys = []
    for rank in (0, 1):
        for b in _take(_loader(shard_root, "pretrain", rank=rank, dp=2, workers=2, mb=1), 12):
            keys += b["keys"]
    # 4 streams x one 6-sample caption shard each = one epoch: all 24, no repeats
    assert sorted(keys) == sorted(f"caption{i:05d}" for i in range(24))


def test_fewer_shards_than_streams_resamples(tmp_path):
    write_task_shards(tmp_path, ("caption",), per_task=12, per_shard=6)  # 2 shards
    src = {"c": SourceConfig("caption-*.tar")}
    keys = []
    for rank in (0, 1):
        for b in _take(_loader(tmp_path, "pretrain", rank=rank, dp=2, workers=2, mb=1,
                               sources=src), 6):
            keys += b["keys"]
    assert sorted(keys) == sorted(f"caption{i:05d}" for i in range(12))


def test_too_few_samples_for_streams_is_a_clear_error(tmp_path):
    write_task_shards(tmp_path, ("caption",), per_task=2, per_shard=2)
    loader = _loader(tmp_path, "pretrain", rank=3, dp=4, mb=1,  # streams 2, 3 get none
                     sources={"c": SourceConfig("caption-*.tar")})
    with pytest.raises(RuntimeError, match="no usable sample"):
        _take(loader, 1)


def test_epochs_roll_over_and_reshuffle(tmp_path):
    write_task_shards(tmp_path, ("caption",), per_task=12, per_shard=3)
    loader = _loader(tmp_path, "pretrain", mb=1, sources={"c": SourceConfig("caption-*.tar")})
    keys = [b["keys"][0] for b in _take(loader, 36)]
    epochs = [keys[i:i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.state_dict()["streams"]["0"]["sources"]["c"][0] == 2  # epoch 2


def test_blending_ratios(shard_root):
    b = Blender([3.0, 1.0, 0.5], seed=1, stream_id=0)
    picks = Counter(b.pick(k) for k in range(20000))
    assert abs(picks[0] / 20000 - 3 / 4.5) < 0.015
    assert abs(picks[2] / 20000 - 0.5 / 4.5) < 0.015
    src = {"cap": SourceConfig("caption-*.tar", 3.0), "txt": SourceConfig("text-*.tar", 1.0)}
    sources = Counter()
    for batch in _take(_loader(shard_root, "multitask", sources=src, mb=4,
                               pack_buffer=1), 60):
        sources.update(batch["sources"])
    share = sources["caption"] / (sources["caption"] + sources["text"])
    assert abs(share - 0.75) < 0.08, sources


def test_manifests_drop_unusable_sources(shard_root):
    loader = _loader(shard_root, "sft")
    assert [name for name, _, _ in loader.spec.sources] == ["chat"]
    assert {t for b in _take(loader, 3) for t in b["task_ids"].unique().tolist()} == \
        {-1, TASKS.index("chat")}
    with pytest.raises(ValueError, match="no source has samples"):
        _loader(shard_root, "pretrain", sources={"t": SourceConfig("text-*.tar")})


def test_packing_efficiency_on_multitask_mix(shard_root):
    loader = _loader(shard_root, "multitask")
    _take(loader, 20)
    st = loader.stats()
    assert st["packing_efficiency"] > 0.85, st
    assert st["skipped_total"] == 0 and st["filtered"] == 0


# ---------------------------------------------------------------- corrupt data

def test_corrupt_data_skipped_counted_logged(tmp_path, caplog):
    good = write_defect_shards(tmp_path)
    loader = _loader(tmp_path, "multitask_unpacked", mb=1, shuffle=False, virtual_streams=1,
                     max_image_pixels=200 * 200, sources={"all": SourceConfig("*.tar")})
    with caplog.at_level(logging.WARNING, logger="qwenvl_train.data"):
        keys = [b["keys"][0] for b in _take(loader, len(good) + 1)]
    assert keys == good + [good[0]]  # nothing valid dropped; then epoch 2 starts
    assert loader.stats()["skipped"] == {
        "bad_image": 1, "bad_json": 1, "missing_image": 1, "image_too_large": 1,
        "box_outside_image": 1, "too_long": 1, "bad_record": 1, "bad_tar": 1}
    assert "shard=b-defects.tar key=badjpeg" in caplog.text
    assert "shard=c-truncated.tar" in caplog.text


def test_too_many_bad_in_a_row_stops(tmp_path):
    write_raw_tar(tmp_path / "bad.tar", [(f"k{i}.json", b"{oops") for i in range(10)])
    loader = _loader(tmp_path, "pretrain", mb=1, max_consecutive_bad=3, virtual_streams=1,
                     sources={"all": SourceConfig("*.tar")})
    with pytest.raises(DataError, match="4 bad samples in a row.*bad_json.*bad.tar"):
        _take(loader, 1)


def test_blending_draws_are_deterministic_per_seed():
    a = [Blender([1, 1], 5, 0).pick(k) for k in range(100)]
    b = [Blender([1, 1], 5, 0).pick(k) for k in range(100)]
    c = [Blender([1, 1], 6, 0).pick(k) for k in range(100)]
    assert a == b != c and 30 < int(np.sum(a)) < 70
