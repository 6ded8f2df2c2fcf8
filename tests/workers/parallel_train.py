"""torchrun worker: train the tiny model under several parallel layouts, one after another.

Usage: parallel_train.py LAYOUT [LAYOUT ...]; LAYOUT is pp{P}, tp{T}, pp{P}xtp{T},
optionally suffixed `:frozen` (stage 1: LLM frozen), `:export` (save a DeepSpeed
checkpoint, reload it into a fresh engine, export consolidated weights before and after),
`:bf16`, `:nan` (a NaN image at step 1), `:gc` (activation checkpointing in ViT and LLM),
`:z{N}` (ZeRO stage N instead of 1), `:overlap` (ZeRO-2 with overlap_comm) or
`:allreduce` (ZeRO-0 with DeepSpeed's post-backward all-reduce, which one replica skips).
The data-parallel size is what the world leaves. Rank 0 writes per-layout losses and grad
norms to $QWENVL_RESULTS_DIR/rank0.json.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallel_common as pc  # noqa: E402

from qwenvl_train.training.optim import build_optimizer  # noqa: E402
from qwenvl_train.training.parallel.config import ParallelConfig  # noqa: E402
from qwenvl_train.training.parallel.engine import init_distributed  # noqa: E402
from qwenvl_train.training.parallel.parallelize import parallelize  # noqa: E402

OUT = Path(os.environ.get("QWENVL_RESULTS_DIR", "."))
EXPORT = Path(os.environ.get("QWENVL_EXPORT_DIR", str(OUT)))


def ds_config(dp: int, bf16: bool = False, zero: int = 1, overlap: bool = False) -> dict:
    return {"bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": pc.MICRO_BATCH,
            "gradient_accumulation_steps": pc.ACCUM,
            "train_batch_size": pc.MICRO_BATCH * pc.ACCUM * dp,
            "gradient_clipping": pc.CLIP,
            "zero_optimization": {"stage": zero, "overlap_comm": overlap},
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}


def loader(grid, dp: int, nan_step: int | None = None):
    """What the trainer's loader would yield on a reading rank of data-parallel rank r;
    with `nan_step`, that step's first micro-batch has a NaN image (NaN loss)."""
    r = grid.get_data_parallel_rank()
    for step in range(pc.STEPS):
        batches = pc.step_batches(step, dp)[r]
        if step == nan_step:
            batches[0]["images"][:] = float("nan")
        yield from batches


def build(pp: int, tp: int, trainable, seed: int = pc.SEED, parts=None, bf16=False,
          engine: bool = True, zero: int = 1, checkpointing: bool = False,
          overlap: bool = False):
    """What the trainer does: model -> freeze -> parallelize -> groups -> engine."""
    cfg = SimpleNamespace(
        parallel=ParallelConfig(pp=pp, tp=tp, zero_stage=zero), model=pc.tiny_config(),
        stage=SimpleNamespace(image_size=pc.IMAGE_SIZE, seq_len=pc.SEQ_LEN,
                              trainable=trainable, pack=True))
    par = parallelize(pc.make_model(trainable, seed, checkpointing), cfg, parts=parts)
    if not engine:
        return par, None
    opt = build_optimizer(par.param_groups(pc.param_groups), lr=pc.LR, betas=(0.9, 0.98),
                          eps=1e-6)
    return par, par.initialize(opt, None, ds_config(par.sizes.dp, bf16, zero, overlap))


def train(par, engine, nan_step=None) -> tuple[list[float], list[float], list]:
    data = par.batches(loader(par.grid, par.sizes.dp, nan_step) if par.reads_data else None)
    losses, norms, task_sums = [], [], []
    for _ in range(pc.STEPS):
        if par.is_pipeline:
            out = par.train_step(engine, data)
            losses.append(out["loss"])
            norms.append(float(out["grad_norm"]))
            task_sums.append(out["task_sums"].tolist())
            continue
        total = torch.zeros(())
        for _ in range(pc.ACCUM):
            loss = engine(**pc.model_inputs(next(data))).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach() / pc.ACCUM
        dist.all_reduce(total, group=par.dp_group)
        losses.append(float(total) / par.sizes.dp)
        norm = engine.get_global_grad_norm()  # None under ZeRO-0 fp32 (not tracked)
        norms.append(float("nan") if norm is None else float(norm))
    return losses, norms, task_sums


def main() -> None:
    if os.environ.get("QWENVL_DEBUG_HANG"):
        import faulthandler

        faulthandler.dump_traceback_later(int(os.environ["QWENVL_DEBUG_HANG"]), exit=True)
    init_distributed()
    results = {}
    for spec in sys.argv[1:]:
        name, _, option = spec.partition(":")
        pp = int((re.search(r"pp(\d+)", name) or [0, 1])[1])
        tp = int((re.search(r"tp(\d+)", name) or [0, 1])[1])
        trainable = ("vit", "adapter") if option == "frozen" else ("vit", "adapter", "llm")
        # The balanced split of the tiny model puts only the (vocab-sized) head on the last
        # stage; `parts` moves decoder layers across the boundary too, except for `pp2xdp2`.
        parts = None if name == "pp2xdp2" or pp == 1 else [0, 2, 5]
        zero = {"overlap": 2, "allreduce": 0}.get(option, 1)
        zero = int(option[1:]) if option.startswith("z") else zero
        par, engine = build(pp, tp, trainable, parts=parts, bf16=option == "bf16", zero=zero,
                            checkpointing=option == "gc", overlap=option == "overlap")
        skips_allreduce = not engine.enable_backward_allreduce
        if option == "allreduce":
            engine.enable_backward_allreduce = True  # what DeepSpeed does by default
        losses, norms, task_sums = train(par, engine, 1 if option == "nan" else None)
        results[spec] = {"losses": losses, "grad_norms": norms, "dp": par.sizes.dp,
                         "task_sums": task_sums, "parts": par.split and par.split.parts,
                         "skips_allreduce": skips_allreduce}
        if option == "export":
            # Export, save a DeepSpeed checkpoint, reload it into a fresh engine (other
            # init), export again: both exports must be identical.
            full = par.full_state_dict()
            if dist.get_rank() == 0:
                torch.save(full, EXPORT / f"{name}_trained.pt")
            engine.save_checkpoint(str(EXPORT / f"{name}_ckpt"), tag="t")
            del engine
            par, engine = build(pp, tp, trainable, seed=pc.SEED + 1, parts=parts)
            engine.load_checkpoint(str(EXPORT / f"{name}_ckpt"), tag="t")
            full = par.full_state_dict()
            if dist.get_rank() == 0:
                torch.save(full, EXPORT / f"{name}_reloaded.pt")
            # Full weights sliced into a fresh layout (no engine) gather back unchanged.
            dist.barrier()
            par, _ = build(pp, tp, trainable, seed=pc.SEED + 2, parts=parts, engine=False)
            par.load_full_state_dict(torch.load(EXPORT / f"{name}_trained.pt"))
            full = par.full_state_dict()
            if dist.get_rank() == 0:
                torch.save(full, EXPORT / f"{name}_sliced.pt")
        del engine
        dist.barrier()
    if dist.get_rank() == 0:
        (OUT / "rank0.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
