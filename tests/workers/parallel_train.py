"""torchrun worker: train the tiny model under several parallel layouts, one after another,
with the production set-up (`build_qwenvl`, `freeze`, `parallelize`, `build_engine` with
the generated DeepSpeed config) and the production `Trainer.fit`, fed the fixed batches of
parallel_common.py as its data iterator.

Usage: parallel_train.py LAYOUT [LAYOUT ...]; LAYOUT is pp{P}, tp{T}, pp{P}xtp{T},
optionally suffixed `:frozen` (stage 1: LLM frozen), `:export` (reload the trainer's
final checkpoint into a fresh engine, export consolidated weights before and after),
`:bf16`, `:nan` (a NaN image at step 1), `:gc` (activation checkpointing in ViT and LLM),
`:lora` (parallel_common.LORA on ViT and LLM), `:z{N}` (ZeRO stage N instead of 1),
`:nooverlap` (ZeRO-2 without overlap_comm, which the generated config turns on) or
`:allreduce` (ZeRO-0 with DeepSpeed's post-backward all-reduce, which one replica skips).
The data-parallel size is what the world leaves. Rank 0 writes per-layout losses and grad
norms to $QWENVL_RESULTS_DIR/rank0.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import parallel_common as pc
import torch
import torch.distributed as dist

from qwenvl_train.config import TrainConfig
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training.callbacks import TrainerCallback
from qwenvl_train.training.config import CheckpointConfig, OptimConfig, StageConfig
from qwenvl_train.training.observe.config import TrackingConfig
from qwenvl_train.training.observe.tracking import ThroughputMeter, Tracker
from qwenvl_train.training.parallel.config import ParallelConfig
from qwenvl_train.training.parallel.engine import DistInfo, init_distributed
from qwenvl_train.training.parallel.parallelize import parallelize
from qwenvl_train.training.run import build_engine, build_qwenvl, dummy_batch, freeze
from qwenvl_train.training.trainer import Trainer, TrainState

OUT = Path(os.environ.get("QWENVL_RESULTS_DIR", "."))
EXPORT = Path(os.environ.get("QWENVL_EXPORT_DIR", str(OUT)))


def layout_config(pp: int, tp: int, zero: int, trainable, run_dir: Path, seed: int,
                  checkpointing: bool, lora: bool = False, bf16: bool = False) -> TrainConfig:
    """The stage of parallel_common.reference: constant LR, its optimizer groups and batch."""
    dp = dist.get_world_size() // (pp * tp)
    optim = OptimConfig(lr=pc.LR, schedule="constant", warmup_steps=0, grad_clip=pc.CLIP,
                        **pc.OPTIM)
    stage = StageConfig(trainable=list(trainable), image_size=pc.IMAGE_SIZE,
                        seq_len=pc.SEQ_LEN, pack=True, micro_batch_size=pc.MICRO_BATCH,
                        global_batch_size=pc.MICRO_BATCH * pc.ACCUM * dp, steps=pc.STEPS,
                        precision="bf16" if bf16 else "fp32", optim=optim)
    model = pc.tiny_config(checkpointing)
    if lora:
        model.lora = dataclasses.replace(pc.LORA)
    cfg = TrainConfig(stage=stage, model=model,
                      parallel=ParallelConfig(zero_stage=zero, pp=pp, tp=tp),
                      tracking=TrackingConfig(backend="none"),
                      checkpoint=CheckpointConfig(every_steps=pc.STEPS), run_dir=str(run_dir),
                      seed=seed)
    cfg.validate()
    return cfg


def build(cfg: TrainConfig, parts=None, engine: bool = True):
    """What `training.run.run` does: model -> freeze -> parallelize -> optimizer -> engine."""
    model = build_qwenvl(cfg)
    if cfg.model.lora.enabled:
        pc.randomize_lora_b(model, cfg.seed)  # as parallel_common.make_model does
    freeze(cfg, model)
    par = parallelize(model, cfg, parts=parts)
    return par, (build_engine(cfg, par) if engine else None)


def fixed_batches(par, nan_step: int | None = None):
    """What the trainer's loader would yield on a reading rank of data-parallel rank r;
    with `nan_step`, that step's first micro-batch has a NaN image (NaN loss)."""
    r, dp = par.dp_rank, par.sizes.dp
    for step in range(pc.STEPS):
        batches = pc.step_batches(step, dp)[r]
        if step == nan_step:
            batches[0]["images"][:] = float("nan")
        yield from batches


class StepRecorder(TrainerCallback):
    """Per-step loss and pre-clip gradient norm as the trainer logged them."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["loss"])
        self.grad_norms.append(metrics.get("grad_norm", float("nan")))  # None: ZeRO-0 fp32


def record_task_sums(par) -> list:
    """Pipeline layouts: each step's per-task (loss, tokens) sums as the pipeline step hands
    them to the trainer."""
    sums: list = []
    train_step = par.train_step

    def recorded(engine, data) -> dict:
        out = train_step(engine, data)
        sums.append(out["task_sums"].tolist())
        return out

    par.train_step = recorded
    return sums


def train(cfg: TrainConfig, info: DistInfo, par, engine, nan_step: int | None = None) -> dict:
    """`Trainer.fit` over the fixed batches; it checkpoints the last step in cfg.run_dir."""
    source = fixed_batches(par, nan_step) if par.reads_data else None
    recorder, task_sums = StepRecorder(), record_task_sums(par) if par.is_pipeline else []
    tracker = Tracker.create(cfg.tracking, cfg.run_dir, {}, info.rank,
                             total_steps=cfg.stage.steps)
    meter = ThroughputMeter.create(cfg, dp_size=par.sizes.dp, device=info.device)
    trainer = Trainer(cfg, info, engine, par, None, par.batches(source), tracker, meter,
                      cfg.stage.grad_accumulation_steps(par.sizes.dp), dummy_batch(cfg),
                      TrainState(), callbacks=[recorder])
    trainer.fit()
    tracker.close()
    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms, "dp": par.sizes.dp,
            "task_sums": task_sums, "parts": par.split and par.split.parts}


def export_and_reload(cfg: TrainConfig, par, name: str, parts) -> None:
    """Export the trained layout; load the trainer's checkpoint into a fresh engine (other
    init) and export again; slice the full weights into a fresh layout and gather them."""
    full = par.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(full, EXPORT / f"{name}_trained.pt")
    fresh = layout_config(cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.zero_stage,
                          cfg.stage.trainable, Path(cfg.run_dir), pc.SEED + 1, False)
    par, engine = build(fresh, parts)
    ckpt.load(engine, cfg.run_dir, ckpt.latest_tag(cfg.run_dir), dist.get_rank())
    full = par.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(full, EXPORT / f"{name}_reloaded.pt")
    dist.barrier()
    fresh.seed = pc.SEED + 2
    par, _ = build(fresh, parts, engine=False)
    par.load_full_state_dict(torch.load(EXPORT / f"{name}_trained.pt"))
    full = par.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(full, EXPORT / f"{name}_sliced.pt")


def main() -> None:
    if os.environ.get("QWENVL_DEBUG_HANG"):
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["QWENVL_DEBUG_HANG"]), exit=True)
    info = init_distributed()
    results = {}
    for spec in sys.argv[1:]:
        name, _, option = spec.partition(":")
        pp = int((re.search(r"pp(\d+)", name) or [0, 1])[1])
        tp = int((re.search(r"tp(\d+)", name) or [0, 1])[1])
        trainable = ("vit", "adapter") if option == "frozen" else ("vit", "adapter", "llm")
        # The balanced split of the tiny model puts only the (vocab-sized) head on the last
        # stage; `parts` moves decoder layers across the boundary too, except for `pp2xdp2`.
        parts = None if name == "pp2xdp2" or pp == 1 else [0, 2, 5]
        zero = {"nooverlap": 2, "allreduce": 0}.get(option, 1)
        zero = int(option[1:]) if option.startswith("z") else zero
        run_dir = OUT / "runs" / spec.replace(":", "-")
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = layout_config(pp, tp, zero, trainable, run_dir, pc.SEED, option == "gc",
                            option == "lora", option == "bf16")
        if option == "nooverlap":
            cfg.parallel.deepspeed = {"zero_optimization": {"overlap_comm": False}}
        par, engine = build(cfg, parts)
        skips_allreduce = not engine.enable_backward_allreduce
        if option == "allreduce":
            engine.enable_backward_allreduce = True  # what DeepSpeed does by default
        results[spec] = train(cfg, info, par, engine, 1 if option == "nan" else None)
        results[spec]["skips_allreduce"] = skips_allreduce
        del engine
        if option == "export":
            export_and_reload(cfg, par, name, parts)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(run_dir)
    if dist.get_rank() == 0:
        (OUT / "rank0.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
