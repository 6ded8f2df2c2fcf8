"""End-to-end runs across layouts and stages, through torchrun on the tiny model: a
checkpoint resumed under another layout (training/relayout.py: the resumed state equals the
checkpoint bit for bit, the losses the uninterrupted run's within RELAYOUT_RTOL) and the
three stages chained. (Split from test_trainer.py so the two pytest workers share the
long runs.)"""

from __future__ import annotations

import json
import shutil

import pytest
from trainer_helpers import (
    TRAIN,
    assert_resumed_exactly,
    assert_step_skipped,
    callbacks,
    close_losses,
    equal_tensors,
    export_state,
    initial_state,
    losses,
    metrics,
    overrides,
    plugin,
    resume_copy,
    split_by_group,
    start_state_plugin,
)

pytestmark = pytest.mark.slow


def test_a_pp2_run_resumes_under_tp2_and_chains_into_a_tp2_stage(torchrun, demo_data,
                                                                  tmp_path):
    """Through the CLI: a pp2 checkpoint resumes under tp2 (other pipeline and tensor
    sizes: re-partitioned); stage 2 under tp2 starts from the pp2 export (that each layout
    equals the single-process run: test_parallel_layouts.py, through the Trainer)."""
    pp2, tp2, resumed = tmp_path / "pp2", tmp_path / "tp2", tmp_path / "resumed"
    torchrun([*TRAIN, *overrides(pp2, demo_data, "parallel=pp2", steps=4)], nproc=2)
    assert sorted(losses(pp2)) == [1, 2, 3, 4]
    step_dir = resume_copy(pp2, resumed, 2)
    start = start_state_plugin(tmp_path / "start")
    torchrun([*TRAIN, *overrides(resumed, demo_data, "parallel=tp2", start, steps=4)], nproc=2)
    assert_resumed_exactly(tmp_path / "start", step_dir)
    close_losses(losses(pp2), losses(resumed), (3, 4))
    b = export_state(pp2)
    torchrun([*TRAIN, *overrides(tp2, demo_data, "parallel=tp2", f"init_from={pp2}",
                                 stage="multitask", steps=2)], nproc=2)
    assert sorted(losses(tp2)) == [1, 2]
    s1, s2 = split_by_group(b), split_by_group(export_state(tp2))
    assert all(equal_tensors(s1[g], s2[g]) for g in ("vit", "adapter", "llm"))  # all trained


def test_stages_chain_1_to_2_to_3_on_demo_data(run_cli, demo_data, tmp_path):
    runs = {s: tmp_path / s for s in ("pretrain", "multitask", "sft")}
    previous = None
    trainable = {"pretrain": 183_424, "multitask": 19_732_288, "sft": 19_573_952}
    for stage, run in runs.items():
        extra = [f"init_from={previous}"] if previous else []
        if stage == "sft":
            extra.append("checkpoint.every_steps=1")
        results = tmp_path / f"{stage}_results"
        results.mkdir()
        hooks = [plugin("results.RankResults", out=str(results))]
        if stage == "sft":  # single process, ZeRO-0: a NaN loss in step 2 skips its update
            hooks.append(plugin("faults.NanLoss", step=2))
        proc = run_cli(TRAIN[1], overrides(run, demo_data, *extra, callbacks(*hooks), steps=2,
                                           stage=stage))
        assert proc.returncode == 0, proc.stderr[-4000:]
        rank0 = json.loads((results / "rank0.json").read_text())
        assert rank0["optimizer_equals_trainable"] and rank0["frozen_in_optimizer"] == 0
        assert rank0["optimizer_numel"] == rank0["trainable_numel"] == trainable[stage]
        previous = run
    assert [m["skipped_steps"] for m in metrics(runs["sft"])] == [0, 1]
    assert_step_skipped(runs["sft"], 2)
    s1, s2, s3 = (split_by_group(export_state(runs[s])) for s in runs)
    init = split_by_group(initial_state())
    assert equal_tensors(init["llm"], s1["llm"]) == []          # stage 1: LLM frozen
    assert equal_tensors(s2["vit"], s3["vit"]) == []            # stage 3: ViT frozen
    for group in ("vit", "adapter", "llm"):                     # stage 2: everything trains
        assert equal_tensors(s1[group], s2[group])
    for group in ("adapter", "llm"):
        assert equal_tensors(s2[group], s3[group])
    assert json.loads((runs["multitask"] / "config.json").read_text())["stage"]["image_size"] == 448


ELASTIC = ("parallel=single", "stage.global_batch_size=8", "stage.micro_batch_size=1",
           "export_at_end=false")


def test_resume_with_more_data_parallel_ranks_matches_the_uninterrupted_losses(
        run_cli, torchrun, demo_data, tmp_path):
    """One process saves at step 2; two processes resume it (the data state is global, and
    ZeRO-0's DeepSpeed files reload under any dp size). Steps 3-4 train on the same global
    batches, each rank on its balanced share.

    Tolerance 1e-5 relative: both runs compute the same 8 micro-batch losses and gradients
    (fp32, CPU) and differ only in the order they are summed (8 accumulated micro-batches
    in one process vs 4 per rank plus an all-reduce over 2), ~1e-7 relative per reordering;
    Adam's normalised update keeps that order of relative change, over 2 steps. Measured:
    ~1e-7."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = run_cli(TRAIN[1], overrides(ref, demo_data, *ELASTIC, steps=4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(ref / "checkpoints" / "step_0000002",
                    run / "checkpoints" / "step_0000002")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    (run / "metrics.jsonl").write_text(
        "".join((ref / "metrics.jsonl").read_text().splitlines(True)[:2]))
    torchrun([*TRAIN, *overrides(run, demo_data, *ELASTIC, steps=4)], nproc=2)
    want, got = losses(ref), losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) <= 1e-5 * abs(want[s]) for s in (3, 4)), (want, got)
    assert metrics(run)[-1]["data/samples"] == metrics(ref)[-1]["data/samples"] == 32
    # The same one-process (ZeRO-0) checkpoint on two ranks under ZeRO-2: re-partitioned.
    zero2 = tmp_path / "zero2"
    step_dir = resume_copy(ref, zero2, 2)
    start = start_state_plugin(tmp_path / "start")
    torchrun([*TRAIN, *overrides(zero2, demo_data, *ELASTIC, "parallel.zero_stage=2", start,
                                 steps=4)], nproc=2)
    assert_resumed_exactly(tmp_path / "start", step_dir)
    close_losses(want, losses(zero2), (3, 4))
