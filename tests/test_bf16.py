"""bf16 runs of the three stages on CPU, 2 ranks: ZeRO-2 (stage 1), ZeRO-3 with fused AdamW
(stage 2, from stage 1's export) and ZeRO-2 with bf16 gradient accumulation (stage 3, from
stage 2's export). Each trains (its first batches' loss falls), keeps its frozen groups
bitwise frozen, keeps the fixed tables fp32, and starts at the fp32 model's loss within a
bf16-sized tolerance.

The fp32 reference of a step-1 loss is computed here, in this process: the trainer's own
model construction (seed, init, `init_from`) in fp32 and the first micro-batch of each
rank's loader -- step 1 logs the loss before any update, so the two runs differ only in
the arithmetic.

Tolerance: bf16 keeps 8 significant bits (unit roundoff u = 2**-9 = 0.00195). The weights
are rounded once (relative error <= u), each matmul output once more, through 2 ViT blocks,
the adapter and 2 decoder layers, and the per-token CE is computed in fp32 from bf16 logits
of size ~0.1-1 at init. The step-1 loss is the mean of ~2,000 per-token CEs near ln(151936)
= 11.93, whose rounding errors are largely independent and average out; a systematic
shift of the logits by a few u changes a CE by a few u x |logit| ~ 0.005. We allow one
bf16 rounding of the loss itself, u x 11.93 = 0.023; measured: 0.00001-0.00016.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trainer_helpers import (
    TRAIN,
    equal_tensors,
    export_state,
    initial_state,
    losses,
    overrides,
    split_by_group,
)

pytestmark = pytest.mark.slow

BF16_LOSS_TOL = 2.0**-9 * math.log(151936)  # 0.023: see the module docstring
STEPS = 3
RUNS = {  # stage -> extra overrides
    "pretrain": ("parallel=zero2",),
    "multitask": ("parallel=zero3", "parallel.fused_adamw=true", "stage.image_size=224"),
    "sft": ("parallel=zero2", "parallel.grad_accum_dtype=bf16", "stage.image_size=224"),
}
PREVIOUS = {"pretrain": None, "multitask": "pretrain", "sft": "multitask"}


def _args(stage: str, root: Path, demo_data: Path) -> list[str]:
    previous = PREVIOUS[stage]
    extra = [*RUNS[stage], *([f"init_from={root / previous}"] if previous else [])]
    # 256-token rows and one checkpoint (at the end): a cheaper run, the same code paths.
    return overrides(root / stage, demo_data, *extra, "stage.seq_len=256",
                     "checkpoint.every_steps=100", steps=STEPS, stage=stage)


@pytest.fixture(scope="module")
def bf16_runs(demo_data, tmp_path_factory):
    from conftest import launch_torchrun

    root = tmp_path_factory.mktemp("bf16")
    for stage in RUNS:
        launch_torchrun([*TRAIN, *_args(stage, root, demo_data), "stage.precision=bf16"], 2,
                        results=root / f"{stage}_results")
    return root


def first_batches_loss(args: list[str], weights: Path | None = None, world: int = 2,
                       steps: int = 1) -> float:
    """In fp32, the mean over ranks and the first `steps` steps of the loss of each rank's
    micro-batch -- at steps=1 what an fp32 run with `args` logs at step 1 (the demo's step
    is one micro-batch per rank) -- with the trainer's initial weights, or with `weights`
    (an export) loaded instead."""
    from qwenvl_train.config import load_config
    from qwenvl_train.data.loader import build_loader
    from qwenvl_train.data.tokenizer import get_tokenizer
    from qwenvl_train.model.weights import load_consolidated
    from qwenvl_train.training.run import build_qwenvl
    from qwenvl_train.training.trainer import _to_device

    cfg = load_config([*args, "stage.precision=fp32", "parallel=single"])
    assert cfg.stage.global_batch_size == world * cfg.stage.micro_batch_size
    model = build_qwenvl(cfg).eval()
    if weights is not None:
        load_consolidated(model, weights)
    total = 0.0
    for rank in range(world):
        loader = build_loader(
            cfg.data, get_tokenizer(), template=cfg.stage.template,
            image_size=cfg.stage.image_size, seq_len=cfg.stage.seq_len, pack=cfg.stage.pack,
            num_image_tokens=cfg.model.adapter.num_queries, dp_rank=rank, dp_size=world,
            micro_batch_size=cfg.stage.micro_batch_size, seed=cfg.seed, num_workers=0)
        source = iter(loader)
        batches = [next(source) for _ in range(steps)]
        source.close()
        with torch.no_grad():
            for batch in batches:
                inputs = _to_device(batch, torch.device("cpu"), torch.float32)
                total += float(model(**inputs).loss)
    return total / (world * steps)


@pytest.mark.parametrize("stage", list(RUNS))
def test_bf16_stage_trains_matches_fp32_and_keeps_frozen_groups(bf16_runs, demo_data, stage):
    root = bf16_runs
    loss = losses(root / stage)
    assert sorted(loss) == list(range(1, STEPS + 1)) and all(map(math.isfinite, loss.values()))
    args = _args(stage, root, demo_data)
    want = first_batches_loss(args)
    print(f"{stage}: bf16 step-1 loss {loss[1]:.5f}, fp32 {want:.5f}, "
          f"|diff| {abs(loss[1] - want):.5f} (tolerance {BF16_LOSS_TOL:.4f})")
    assert abs(loss[1] - want) < BF16_LOSS_TOL
    # It trains: the loss of the batches it trained on is lower under the trained weights.
    # (All of them: three steps at the demo's learning rate may raise one batch's loss, in
    # fp32 as well.)
    initial = first_batches_loss(args, steps=STEPS)
    trained = first_batches_loss(args, weights=root / stage / "export", steps=STEPS)
    print(f"{stage}: the {STEPS} steps' batches: loss {initial:.4f} at the start, "
          f"{trained:.4f} trained")
    assert trained < initial - 0.01

    after = export_state(root / stage)
    assert after["adapter.pos_embed"].dtype == torch.float32  # the sin-cos table stays fp32
    assert after["llm.lm_head.weight"].dtype == torch.bfloat16
    previous = PREVIOUS[stage]
    if previous is None:
        start = {k: v.to(after[k].dtype) for k, v in initial_state().items()}
    else:
        start = export_state(root / previous)
    before, after = split_by_group(start), split_by_group(after)
    frozen = {"pretrain": {"llm"}, "multitask": set(), "sft": {"vit"}}[stage]
    for group in ("vit", "adapter", "llm"):
        changed = equal_tensors(before[group], after[group])
        if group in frozen:
            assert changed == [], (group, changed[:3])  # bitwise frozen
        else:
            assert changed, group
