"""Per-rank facts of a real run for the multi-process tests: `out/rank{r}.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qwenvl_train.training.callbacks import TrainerCallback


class RankResults(TrainerCallback):
    """Writes the run summary and whether the optimizer holds exactly the trainable
    parameters, as the DeepSpeed engine of the run sees them at the start of training."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.optimizer_check: dict = {}

    def on_train_start(self, trainer) -> None:
        if not trainer.par.is_pipeline:  # pipeline stages hold renamed shards of the model
            self.optimizer_check = optimizer_check(trainer.engine)

    def on_run_end(self, trainer, summary: dict) -> None:
        rank = trainer.dist.rank
        result = {"rank": rank, "summary": summary, **self.optimizer_check}
        (self.out / f"rank{rank}.json").write_text(json.dumps(result))


def optimized_parameters(engine) -> list[nn.Parameter]:
    """The model parameters the engine's optimizer updates. ZeRO and DeepSpeed's bf16/fp16
    wrappers flatten the groups and keep the originals per group (ZeRO drops parameters
    without requires_grad there); the plain optimizer keeps them in `param_groups`."""
    opt = engine.optimizer
    for name in ("bit16_groups", "fp16_groups", "bf16_groups"):
        groups = getattr(opt, name, None)
        if groups is not None:
            return [p for group in groups for p in group]
    return [p for group in opt.param_groups for p in group["params"]]


def optimizer_check(engine) -> dict:
    """Does the optimizer hold exactly the trainable parameters?"""
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    optimized = optimized_parameters(engine)
    model = list(engine.module.parameters())
    in_optimizer = {id(p) for p in optimized}
    trainable = {id(p) for p in model if p.requires_grad}
    return {
        "optimizer_numel": sum(numel(p) for p in optimized),
        "trainable_numel": sum(numel(p) for p in model if p.requires_grad),
        "optimizer_equals_trainable": in_optimizer == trainable,
        "frozen_in_optimizer": len(in_optimizer - trainable),
    }


class StartState(TrainerCallback):
    """At the start of training (after any resume), each rank of data-parallel rank 0
    writes its tensor slice of every trainable parameter's full fp32 weight and Adam
    moments, Adam's step count, the groups' learning rates and the engine's step counter
    to `out/state_rank{r}.pt` (tests/trainer_helpers.start_state joins the slices)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from qwenvl_train.training import relayout

        engine, par = trainer.engine, trainer.par
        zero = engine.zero_optimization_stage()
        base = engine.optimizer if zero == 0 else engine.optimizer.optimizer  # torch's
        params = {}
        for _, original, p in relayout.trainable_params(par):  # collective over dp ranks
            if zero == 0:  # fp32 without ZeRO: the parameter is the master weight
                state = {"fp32": p.detach().clone(), "exp_avg": base.state[p]["exp_avg"],
                         "exp_avg_sq": base.state[p]["exp_avg_sq"]}
            else:
                state = {"fp32": safe_get_full_fp32_param(p),
                         "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                         "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
            params[original] = {**state, "dim": getattr(p, "partition_dim", None) if getattr(
                p, "tensor_model_parallel", False) else None}
        if par.dp_rank == 0:
            # ZeRO-3 hands the base optimizer its partitions only during a step
            flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
                p for g in base.param_groups for p in g["params"]]
            torch.save({"params": params, "tp_rank": par.grid.get_slice_parallel_rank(),
                        "steps": [float(base.state[p]["step"]) for p in flats],
                        "lrs": {g["name"]: g["lr"] for g in base.param_groups},
                        "global_steps": engine.global_steps},
                       self.out / f"state_rank{trainer.dist.rank}.pt")
