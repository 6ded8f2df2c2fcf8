"""Capacity planning: what a stage and layout need per GPU, the largest micro-batch that
fits, and the step time at a stated MFU (`qwenvl-plan`, qwenvl_train/cli/plan.py).

Memory is observe/memory.py's model; FLOPs are observe/flops.py's `step_flops` (the MFU
formula, ViT included); peak FLOP/s come from flops.py's table. A micro-batch is planned
as the stage lays rows out: `micro_batch_size` rows of `seq_len` tokens (packed rows full),
one image per unpacked row and, in packed rows, as many `<img>` samples as the pipeline
split assumes (`partition.images_per_row`); every text position carries a label (the most
the LM head and loss can see).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qwenvl_train.checks import ConfigError
from qwenvl_train.training.observe import flops
from qwenvl_train.training.observe.memory import (
    MASKLESS,
    Layout,
    Memory,
    Options,
    Workload,
    layout_from_config,
    memory_per_gpu,
    options_from_config,
)
from qwenvl_train.training.parallel.partition import images_per_row

if TYPE_CHECKING:
    import torch

    from qwenvl_train.config import TrainConfig

GIB = 2**30
# Memory as `nvidia-smi` reports it (MiB); the peak FLOP/s are flops.py's table.
GPU_MEMORY_MIB = {"H100": 81_559, "H200": 143_771, "A100": 81_920}
# Share of a device's memory the planner lets tensors take: the rest is the CUDA context,
# NCCL's buffers and the caching allocator's fragmentation.
USABLE_FRACTION = 0.90


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes
    peak_flops: float  # dense bf16 FLOP/s

    @property
    def usable(self) -> float:
        return self.memory * USABLE_FRACTION


def gpu(name: str) -> GPU:
    key = name.upper()
    if key not in GPU_MEMORY_MIB:
        raise ConfigError(f"--gpu: {name!r} is not known; choose one of {sorted(GPU_MEMORY_MIB)}")
    return GPU(key, GPU_MEMORY_MIB[key] * 2**20, flops.peak_flops(key, "bf16"))


# ---- one micro-batch and one step of a stage ---------------------------------------------
def images_in(cfg: TrainConfig, rows: int) -> int:
    per_row = images_per_row(cfg.stage.seq_len, cfg.model.adapter.num_queries, cfg.stage.pack)
    return max(1, math.ceil(rows * per_row - 1e-9))


def workload(cfg: TrainConfig, rows: int) -> Workload:
    """A micro-batch of `rows` rows as the stage lays them out (module docstring)."""
    length, q = cfg.stage.seq_len, cfg.model.adapter.num_queries
    images = images_in(cfg, rows)
    per_row = images / rows
    labels = max(0, rows * length - images * (q + 2))
    return Workload(rows=rows, seq_len=length, images=images, label_tokens=labels,
                    segment_len=length / per_row if cfg.stage.pack else length)


def workload_of_batch(batch: dict) -> Workload:
    """The Workload of a real batch (docs/contracts.md): label tokens counted where the
    model computes the loss (a label on the next token of the same sample)."""
    import torch

    from qwenvl_train.tokens import IGNORE_INDEX

    labels, segments = batch["labels"], batch["segment_ids"]
    valid = (labels[:, 1:] != IGNORE_INDEX) & (segments[:, 1:] == segments[:, :-1])
    lengths = [int(n) for row in segments for n in torch.bincount(row[row > 0]) if n]
    rows, length = labels.shape
    return Workload(rows=rows, seq_len=length, images=int(batch["images"].shape[0]),
                    label_tokens=int(valid.sum()),
                    segment_len=flops.effective_segment_len(lengths))


def step_flops_of(cfg: TrainConfig) -> float:
    """Training FLOPs of one optimizer step (the whole global batch), flops.step_flops."""
    work = workload(cfg, cfg.stage.global_batch_size)
    return flops.step_flops(cfg.model, cfg.stage.image_size, work.tokens, work.images,
                            work.seq_len, list(cfg.stage.trainable),
                            loss_tokens=work.label_tokens,
                            segment_len=work.segment_len if cfg.stage.pack else None)


def accumulation(cfg: TrainConfig, rows: int, dp: int) -> int:
    return max(1, cfg.stage.global_batch_size // (rows * dp))


def memory_for(cfg: TrainConfig, layout: Layout, opt: Options, rows: int) -> Memory:
    return memory_per_gpu(cfg.model, list(cfg.stage.trainable), cfg.stage.image_size,
                          workload(cfg, rows), opt, layout,
                          accum=accumulation(cfg, rows, layout.dp), pack=cfg.stage.pack)


def max_micro_batch(cfg: TrainConfig, layout: Layout, opt: Options, usable: float,
                    limit: int = 512) -> int:
    """The largest micro-batch (rows) whose peak fits in `usable` bytes; 0 if none."""
    if memory_for(cfg, layout, opt, 1).peak > usable:
        return 0
    lo, hi = 1, 2
    while hi <= limit and memory_for(cfg, layout, opt, hi).peak <= usable:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # peak grows with the rows: bisect between lo (fits) and hi
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory_for(cfg, layout, opt, mid).peak <= usable else (lo, mid)
    return lo


@dataclass
class PlanRow:
    stage: str
    layout: str
    sizes: Layout
    micro_batch: int
    accum: int
    memory: Memory  # at the config's micro-batch and checkpointing
    act_no_ckpt: float  # activations per GPU at the config's micro-batch
    act_ckpt: float
    max_mb_no_ckpt: int
    max_mb_ckpt: int
    step_flops: float
    step_time: float  # seconds at the stated MFU on all GPUs
    options: Options  # what the peak assumes (from the config, for CUDA)


def plan_row(cfg: TrainConfig, layout_name: str, world: int, device: GPU, mfu: float) -> PlanRow:
    layout = layout_from_config(cfg, world)
    opt = options_from_config(cfg, on_cuda=True)
    every = {part: k or 1 for part, k in opt.checkpoint.items()}  # ckpt on: config's k or 1
    with_ckpt, without = replace(opt, checkpoint=every), replace(opt, checkpoint={"vit": 0,
                                                                                  "llm": 0})
    rows = cfg.stage.micro_batch_size
    step = step_flops_of(cfg)
    return PlanRow(
        stage=cfg.stage.name, layout=layout_name, sizes=layout, micro_batch=rows,
        accum=accumulation(cfg, rows, layout.dp), memory=memory_for(cfg, layout, opt, rows),
        act_no_ckpt=memory_for(cfg, layout, without, rows).activations,
        act_ckpt=memory_for(cfg, layout, with_ckpt, rows).activations,
        max_mb_no_ckpt=max_micro_batch(cfg, layout, without, device.usable),
        max_mb_ckpt=max_micro_batch(cfg, layout, with_ckpt, device.usable),
        step_flops=step, step_time=step / (world * device.peak_flops * mfu), options=opt)


def format_table(rows: list[PlanRow], device: GPU, world: int, mfu: float) -> str:
    g = lambda x: f"{x / GIB:6.1f}"  # noqa: E731
    head = (f"{'stage':10} {'layout':8} {'pp x tp x dp':>12} {'ZeRO':>4} {'mb':>3} "
            f"{'accum':>5} {'params':>6} {'grads':>6} {'optim':>6} {'buffer':>6} "
            f"{'act':>6} {'act':>6} {'peak':>6} {'fits':>4} {'max mb':>6} {'max mb':>6} "
            f"{'PFLOP':>7} {'step s':>7}")
    sub = (f"{'':10} {'':8} {'':>12} {'':>4} {'':>3} {'':>5} {'GiB':>6} {'GiB':>6} "
           f"{'GiB':>6} {'GiB':>6} {'no ckpt':>6} {'ckpt':>6} {'GiB':>6} {'':>4} "
           f"{'no ckpt':>6} {'ckpt':>6} {'/step':>7} {f'@{mfu:.0%}':>7}")
    lines = [f"{world} x {device.name} ({device.memory / GIB:.0f} GiB, planning with "
             f"{USABLE_FRACTION:.0%}; {device.peak_flops / 1e12:.0f} TFLOP/s bf16 peak)",
             head, sub]
    for r in rows:
        m, s = r.memory, r.sizes
        fits = "yes" if m.peak <= device.usable else "no"
        lines.append(
            f"{r.stage:10} {r.layout:8} {f'{s.pp} x {s.tp} x {s.dp}':>12} {s.zero:>4} "
            f"{r.micro_batch:>3} {r.accum:>5} {g(m.params)} {g(m.grads)} {g(m.optimizer)} "
            f"{g(m.buffers)} {g(r.act_no_ckpt)} {g(r.act_ckpt)} {g(m.peak)} {fits:>4} "
            f"{r.max_mb_no_ckpt:>6} {r.max_mb_ckpt:>6} {r.step_flops / 1e15:7.1f} "
            f"{r.step_time:7.1f}")
    lines.append("act: activations per GPU at the stage's micro-batch (mb rows); peak: "
                 "states + activations + the largest transient, with the config's "
                 "checkpointing; max mb: the largest micro-batch that fits")
    for text in sorted({describe(r.options) for r in rows}):
        lines.append(f"assumed: {text}")
    return "\n".join(lines)


def describe(opt: Options) -> str:
    """The options a plan assumed, in config terms."""
    ckpt = ", ".join(f"{part} every {k} layer(s)" if k else f"{part} off"
                     for part, k in opt.checkpoint.items())
    mask = "no [L, L] mask" if opt.attention in MASKLESS else "a [B, 1, L, L] mask"
    names = {4: "fp32", 2: "bf16"}
    return (f"precision {names[opt.param_bytes]} (gradients {names[opt.grad_bytes]}), "
            f"attention {opt.attention} ({mask}), loss {'chunked' if opt.chunked_loss else 'plain'}"
            f", checkpointing {ckpt}, AdamW {'fused' if opt.fused_adamw else 'multi-tensor'}")


# ---- the pre-launch check ----------------------------------------------------------------
def required_memory_bytes(cfg: TrainConfig, world_size: int,
                          device: torch.device | str) -> tuple[int, int]:
    """(needed, available) bytes per device for a run of `cfg` on `world_size` ranks.

    `needed`: the planner's peak at the stage's micro-batch on the most loaded rank (with
    the options as they resolve on that device). `available`: USABLE_FRACTION of the
    device's memory -- a CUDA device's total memory, a GPU name of `GPU_MEMORY_MIB`, or,
    for the CPU, this machine's RAM shared by the ranks of the node."""
    import torch

    name = device if isinstance(device, str) else None
    dev = torch.device(device) if name is None or name.lower() in ("cpu", "cuda") else None
    if dev is not None and dev.type == "cuda":
        total, on_cuda = torch.cuda.get_device_properties(dev).total_memory, True
    elif dev is not None:  # CPU: the node's RAM over its ranks
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks)
        on_cuda = False
    else:
        total, on_cuda = gpu(name).memory, True
    layout = layout_from_config(cfg, world_size)
    opt = options_from_config(cfg, on_cuda=on_cuda)
    needed = memory_for(cfg, layout, opt, cfg.stage.micro_batch_size).peak
    return int(needed), int(total * USABLE_FRACTION)
