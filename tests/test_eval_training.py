"""Evaluation during training (the `eval` config, eval/during_training.py) in real runs:
every metric is logged with known values (training is bitwise unchanged by it: asserted in
test_trainer.py against its evaluated reference run), a 2-rank
ZeRO-3 run reduces the validation loss over ranks to what one process computes, and a
2-stage pipeline evaluates its gathered model on rank 0 to the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import TRAIN, callbacks, losses, overrides, plugin

from data_recipes.wds import read_samples
from qwenvl_train.eval.metrics import cider_d

pytestmark = pytest.mark.slow

# A small multitask stage: 56px images, 3 steps, evaluated after steps 2 and 3 (the last)
# on 4 items per task.
SMALL = ("stage.image_size=56", "eval=demo", "eval.every_steps=2", "eval.max_items=4")


def _eval_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())}


def test_eval_logs_every_metric(run_cli, demo_data, tmp_path):
    """That evaluation leaves training bitwise unchanged is asserted where a reference run
    exists anyway: test_trainer.py's evaluated ZeRO-2 reference and the kill-during-save
    rerun without evaluation give the same 6 losses bit for bit."""
    run = tmp_path / "eval"
    oracle = callbacks(plugin("oracle.OracleAnswers"))
    proc = run_cli(TRAIN[1], overrides(run, demo_data, *SMALL, oracle, steps=3,
                                       stage="multitask"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(run)) == [1, 2, 3]

    rows = _eval_rows(run)
    assert sorted(rows) == [2, 3]
    last = rows[3]
    # Validation loss for every task the multitask template renders; chat has none.
    for task in ("caption", "vqa", "grounding"):
        assert 5.0 < last[f"eval/{task}/loss"] < 13.0, last
    assert "eval/chat/loss" not in last
    # Generation metrics with the oracle: items 0 and 2 answered right, 1 and 3 wrong.
    assert last["eval/vqa/vqa_accuracy"] == last["eval/vqa/exact_match"] == 0.5
    assert last["eval/grounding/grounding_accuracy"] == last["eval/grounding/parse_rate"] == 0.5
    assert last["eval/chat/exact_match"] == last["eval/chat/token_f1"] == 0.5
    refs = [rec["captions"] for rec, _ in read_samples(str(demo_data / "val"),
                                                       "caption-*.tar").values()][:4]
    preds = [refs[0][0], "zzz", refs[2][0], "zzz"]
    assert last["eval/caption/cider_d"] == pytest.approx(cider_d(preds, refs))
    assert all(last[f"eval/{t}/num_items"] == 4 for t in ("caption", "vqa", "grounding", "chat"))
    # The final evaluation is in the run's summary too.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/vqa/vqa_accuracy"] == 0.5
    assert "[eval step 3] vqa: loss" in proc.stdout + proc.stderr


def _plain_chat_loss(args: list[str], run: Path) -> float:
    """The chat validation loss one process computes on the run's exported weights."""
    from qwenvl_train.config import load_config
    from qwenvl_train.eval.during_training import Evaluator
    from qwenvl_train.eval.run_eval import load_export

    evaluator = Evaluator(load_config(args))
    evaluator.data = evaluator.read()
    model = load_export(run / "export", 56)
    loss, tokens = evaluator.plain_losses(model, torch.device("cpu"), torch.float32)["chat"]
    assert float(tokens) > 0
    return float(loss / tokens)


def test_two_rank_zero3_eval_sums_the_validation_loss_over_ranks(torchrun, demo_data, tmp_path):
    """ZeRO-3, 2 ranks, the sft stage: the loss runs through the partitioned engine on both
    ranks (5 records: rank 1 is one micro-batch short and runs the dummy batch), generation
    on rank 0's gathered copy. The chat loss equals one process's on the exported weights."""
    run = tmp_path / "run"
    args = overrides(run, demo_data, "parallel=zero3", "stage.image_size=56", "eval=demo",
                     "eval.every_steps=2", "eval.max_items=5", "eval.generation.max_new_tokens=4",
                     steps=2, stage="sft")
    torchrun([*TRAIN, *args], nproc=2, timeout=420)
    last = _eval_rows(run)[2]
    for key in ("caption/cider_d", "vqa/vqa_accuracy", "grounding/grounding_accuracy",
                "chat/exact_match", "chat/token_f1"):
        assert 0.0 <= last[f"eval/{key}"] <= 10.0, key
    assert last["eval/chat/num_items"] == 5 and "eval/vqa/loss" not in last  # sft: chat only
    assert last["eval/chat/loss"] == pytest.approx(_plain_chat_loss(args, run), rel=1e-5)


def test_pipeline_eval_runs_on_the_gathered_model_on_rank_0(torchrun, demo_data, tmp_path):
    """pp2 with LoRA, the sft stage, one step: the stages' weights are gathered to rank 0,
    the adapters merged into a plain copy that computes the loss and answers every item
    while rank 1 waits; the loss equals one process's on the (merged) exported weights."""
    run = tmp_path / "run"
    args = overrides(run, demo_data, "parallel=pp2", "model.lora.enabled=true",
                     "stage.image_size=56", "eval=demo",
                     "eval.max_items=3", "eval.generation.max_new_tokens=3",
                     "stage.optim.warmup_steps=1", steps=1, stage="sft")
    torchrun([*TRAIN, *args], nproc=2, timeout=300)
    last = _eval_rows(run)[1]  # the last step is always evaluated
    assert all(last[f"eval/{t}/num_items"] == 3 for t in ("caption", "vqa", "grounding", "chat"))
    assert last["eval/chat/loss"] == pytest.approx(_plain_chat_loss(args, run), rel=1e-5)
