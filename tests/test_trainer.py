"""End-to-end trainer runs on the tiny model and the small demo set, through torchrun."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

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
    update_state,
)

from qwenvl_train.training.checkpoint import latest_tag

pytestmark = pytest.mark.slow


ZERO2 = ("parallel=zero2",)
# Evaluation during training, cheap: 2 items per task, 4 new tokens.
EVAL = ("eval=demo", "eval.every_steps=2", "eval.max_items=2", "eval.generation.max_new_tokens=4")


@pytest.fixture(scope="module")
def zero2_reference(demo_data, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 stage-1 run of 6 steps (shared by several tests),
    evaluated every 2 steps: the runs without evaluation that resume must reproduce its
    losses exactly."""
    from conftest import RunResult, launch_torchrun

    run, results = tmp_path_factory.mktemp("ref") / "run", tmp_path_factory.mktemp("ref_results")
    result: RunResult = launch_torchrun(
        [*TRAIN, *overrides(run, demo_data, *ZERO2, *EVAL, "tracking=wandb_offline",
                            "export.formats=[consolidated,released,hf_llm]",
                            callbacks(plugin("results.RankResults", out=str(results))))], 2,
        results=results)
    return run, result


def test_stage1_two_ranks_trains_adapter_and_vit_keeps_llm_frozen(zero2_reference):
    run, result = zero2_reference
    loss = losses(run)
    assert sorted(loss) == list(range(1, 7))
    first, last = sum(loss[s] for s in (1, 2)) / 2, sum(loss[s] for s in (5, 6)) / 2
    assert last < first, loss
    before, after = split_by_group(initial_state()), split_by_group(export_state(run))
    assert equal_tensors(before["llm"], after["llm"]) == []          # frozen: bitwise equal
    assert len(equal_tensors(before["vit"], after["vit"])) > 0        # trained: changed
    assert len(equal_tensors(before["adapter"], after["adapter"])) > 0
    for rank in (0, 1):
        r = result.ranks[rank]
        assert r["optimizer_equals_trainable"] and r["frozen_in_optimizer"] == 0
        assert r["optimizer_numel"] == r["trainable_numel"] > 0
    assert latest_tag(run) == "step_0000006"
    last = metrics(run)[-1]  # data counters summed over both ranks: 6 steps x 4 samples
    assert last["data/samples"] == last["data/rows"] == 24
    assert last["data/skipped_total"] == 0 and last["data/skipped_bad_image"] == 0
    assert list((run / "wandb").glob("offline-run-*"))
    assert (run / "export" / "llm" / "config.json").exists()
    # Evaluation after steps 2, 4, 6: the caption loss (what stage 1 renders) reduced over
    # both ranks, generation metrics of the items both ranks answered, and the W&B table.
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6]
    for e in evals:
        assert 5.0 < e["eval/caption/loss"] < 13.0 and "eval/vqa/loss" not in e
        assert {f"eval/{t}/num_items" for t in ("caption", "vqa", "grounding", "chat")} <= e.keys()
        assert {"eval/caption/cider_d", "eval/vqa/vqa_accuracy", "eval/chat/token_f1",
                "eval/grounding/grounding_accuracy"} <= e.keys()
    tables = sorted(run.glob("wandb/offline-run-*/files/media/table/eval/samples_*.table.json"))
    assert len(tables) == 3
    rows = json.loads(tables[-1].read_text())
    assert rows["columns"] == ["task", "key", "image", "prompt", "answer", "reference"]
    assert sorted({r[0] for r in rows["data"]}) == ["caption", "chat", "grounding", "vqa"]


def test_sigkill_and_rerun_reproduces_the_uninterrupted_losses_zero3(torchrun, demo_data,
                                                                     tmp_path):
    """kill -9 after step 5 (ZeRO-3, checkpoint at step 3): the rerun trains steps 4 and 5
    again from the checkpoint and logs the losses the killed run logged for them, bit for
    bit (step 5's loss follows step 4's update: the restored optimizer state counts too)."""
    run = tmp_path / "run"
    args = ("parallel=zero3", "checkpoint.every_steps=3")
    kill = callbacks(plugin("faults.KillAfterStep", step=5))
    torchrun([*TRAIN, *overrides(run, demo_data, *args, kill, steps=5)], nproc=2, check=False)
    assert latest_tag(run) == "step_0000003"
    before = losses(run)
    assert sorted(before) == [1, 2, 3, 4, 5]
    torchrun([*TRAIN, *overrides(run, demo_data, *args, steps=5)], nproc=2)
    assert losses(run) == before  # bitwise-equal floats
    # The ZeRO-3 checkpoint of 2 ranks resumes in one process (relayout.py).
    resumed = tmp_path / "resumed"
    step_dir = resume_copy(run, resumed, 3)
    start = start_state_plugin(tmp_path / "start")
    torchrun([*TRAIN, *overrides(resumed, demo_data, *args, start, steps=5)], nproc=1)
    assert_resumed_exactly(tmp_path / "start", step_dir)
    close_losses(before, losses(resumed), (4, 5))


def test_kill_during_save_keeps_previous_checkpoint_loadable(torchrun, demo_data, tmp_path,
                                                             zero2_reference):
    """kill -9 in the middle of step 4's save (ZeRO-2): the rerun resumes step 2's checkpoint
    and reproduces the uninterrupted run's 6 losses bit for bit. The reference evaluated every
    2 steps and this run does not: evaluation leaves training unchanged."""
    ref, run = zero2_reference[0], tmp_path / "run"
    kill = callbacks(plugin("faults.KillInSave", step=4))
    torchrun([*TRAIN, *overrides(run, demo_data, *ZERO2, kill)], nproc=2, check=False)
    assert latest_tag(run) == "step_0000002"   # step 4 was half-written; latest did not move
    assert (run / "checkpoints" / "step_0000004").exists()
    torchrun([*TRAIN, *overrides(run, demo_data, *ZERO2)], nproc=2)
    assert latest_tag(run) == "step_0000006"
    assert losses(run) == losses(ref)


def test_a_zero2_checkpoint_of_two_ranks_resumes_on_one_without_zero(torchrun, demo_data,
                                                                     tmp_path, zero2_reference):
    """ZeRO-2 partitions Adam's state over the data-parallel ranks; a resume with another
    number of ranks, here also without ZeRO (one whole optimizer), re-assembles it
    (training/relayout.py)."""
    ref, run = zero2_reference[0], tmp_path / "run"
    step_dir = resume_copy(ref, run, 4)
    start = start_state_plugin(tmp_path / "start")
    torchrun([*TRAIN, *overrides(run, demo_data, "parallel=single", start)], nproc=1)
    assert_resumed_exactly(tmp_path / "start", step_dir)
    assert sorted(losses(run)) == list(range(1, 7))
    close_losses(losses(ref), losses(run), (5, 6))


def test_nan_loss_skips_the_step_on_all_ranks_or_stops(torchrun, demo_data, tmp_path):
    run, nan = tmp_path / "skip", callbacks(plugin("faults.NanLoss", step=3))
    torchrun([*TRAIN, *overrides(run, demo_data, "parallel=zero2", nan, "checkpoint.every_steps=1",
                                 "checkpoint.keep_last=4", steps=4)], nproc=2)
    rows = {m["step"]: m for m in metrics(run)}
    assert rows[3]["skipped_steps"] == 1 and rows[2]["skipped_steps"] == 0
    assert all(v == 0.0 for k, v in rows[3].items() if k.startswith("lr/"))
    assert_step_skipped(run, 3)
    assert equal_tensors(update_state(run, 3), update_state(run, 4))  # step 4 updates again
    stop = tmp_path / "stop"
    failed = torchrun([*TRAIN, *overrides(stop, demo_data, "parallel=zero2", "nan_policy=stop",
                                          nan, steps=4)], nproc=2, check=False)
    assert failed.returncode != 0
    assert "non-finite loss at step 3" in failed.output and "batch keys" in failed.output


def test_sigterm_to_torchrun_saves_a_checkpoint_and_resumes(torchrun, demo_data, tmp_path):
    """As SLURM preempts: SIGTERM reaches torchrun, which signals each rank's process group
    (DataLoader workers included); every rank finishes its step, saves and exits."""
    from conftest import REPO, _env

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", *TRAIN, *overrides(run, demo_data, "data.num_workers=1",
                                                     steps=400)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (
            (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    step = max(losses(run))
    assert 3 <= step < 400, out[-3000:]
    assert latest_tag(run) == f"step_{step:07d}", out[-3000:]
    assert json.loads((run / "summary.json").read_text())["preempted"] is True
    # The rerun picks up exactly there (a short run: 2 more steps).
    kill = callbacks(plugin("faults.KillAfterStep", step=step + 2))
    torchrun([*TRAIN, *overrides(run, demo_data, kill, steps=400)], nproc=2, check=False)
    assert max(losses(run)) == step + 2


def test_text_only_rank_does_not_hang_under_zero3(torchrun, tmp_path):
    result = torchrun(["tests/workers/text_only_rank.py", str(tmp_path)], nproc=2, timeout=180)
    assert result.ranks[0]["steps"] == result.ranks[1]["steps"] == 2
    assert result.ranks[1]["num_images"] == 0 and result.ranks[0]["num_images"] > 0
    assert result.ranks[0]["losses"] == result.ranks[1]["losses"]  # both report the global mean


def test_launch_refuses_what_a_resume_cannot_honour(demo_data, tmp_path, zero2_reference):
    """Checked before any process group starts, naming the key and the numbers."""
    from qwenvl_train.config import ConfigError, load_config
    from qwenvl_train.training.elastic import check_resume

    ref = zero2_reference[0]  # 2 ranks, ZeRO-2, global batch 4, 8 virtual streams
    run = tmp_path / "run"
    tag = latest_tag(ref)
    (run / "checkpoints" / tag).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag)
    shutil.copy(ref / "checkpoints" / tag / "data_state.json", run / "checkpoints" / tag)

    def refused(world: int, *extra: str) -> str:
        cfg = load_config(overrides(run, demo_data, *ZERO2, *extra))
        with pytest.raises(ConfigError) as e:
            check_resume(cfg, world)
        return str(e.value)

    assert "data.virtual_streams: the checkpoint" in refused(2, "data.virtual_streams=16")
    assert "written with 4, this run has 8" in refused(2, "stage.global_batch_size=8")
    check_resume(load_config(overrides(run, demo_data, *ZERO2)), 1)  # re-partitioned
    # The frozen LLM is random here: zero.Init would draw it differently than ZeRO-2 did.
    assert "frozen part(s) llm are randomly initialised" in refused(1, "parallel=zero3")
    check_resume(load_config(overrides(run, demo_data, "parallel=single")), 2)
    assert "bf16/fp16 without ZeRO" in refused(2, "parallel=single", "stage.precision=bf16")
    check_resume(load_config(overrides(run, demo_data, *ZERO2, "data.num_workers=0")), 2)
    state_file = run / "checkpoints" / tag / "data_state.json"
    state = json.loads(state_file.read_text())
    del state["layout"]["rank_maps"]  # as a checkpoint written before the maps existed
    state_file.write_text(json.dumps(state))
    assert "written before checkpoints recorded" in refused(1)
    check_resume(load_config(overrides(run, demo_data, *ZERO2)), 2)  # its own layout: fine
    state_file.write_text(json.dumps({**state, "layout": {**state["layout"], "rank_maps": True}}))
    # `qwenvl-train` runs it with the launch's world size, before distributed init, after
    # checking that the virtual streams cover this launch's readers.
    from qwenvl_train.config import validate_launch

    with pytest.raises(ConfigError, match="bf16/fp16 without ZeRO"):
        validate_launch(load_config(overrides(run, demo_data, "parallel=single",
                                              "stage.precision=bf16")), world_size=1)
    with pytest.raises(ConfigError, match=r"dp=4 x 1 loader worker\(s\) = 4 readers"):
        validate_launch(load_config(overrides(run, demo_data, *ZERO2, "data.virtual_streams=2",
                                              "stage.micro_batch_size=1")), world_size=4)
