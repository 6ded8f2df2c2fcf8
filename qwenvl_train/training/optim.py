"""Optimizer parameter groups and the learning-rate schedule, derived from the group registry.

Every trainable parameter lands in exactly one optimizer group keyed by (module group,
LoRA matrix or not, ViT depth, weight decay or not); LoRA matrices get groups of their own
(`llm/lora/...`) with their module group's LR scale and the stage's weight decay. A group's
LR is `schedule(step) * lr_scale`, where
`lr_scale = stage.optim.group_lr_scale[group] * vit_layer_decay ** (depth_max - depth)` for
ViT parameters (the last block trains at the full rate) and the group scale otherwise.
Frozen parameters are not in the optimizer at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from qwenvl_train.model.groups import group_of, is_lora, layer_decay_scale, skips_weight_decay


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to `peak`, then cosine (or linear/constant) down to `floor` at `total`."""

    peak: float
    floor: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"

    def lr(self, step: int) -> float:
        """LR used by optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (self.peak - self.floor) * shape


@dataclass
class ParamGroupInfo:
    name: str
    lr_scale: float
    weight_decay: float
    numel: int


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    group_lr_scale: dict[str, float],
    vit_layer_decay: float,
    num_vit_layers: int,
    post_group: str = "vit",
) -> tuple[list[dict], list[ParamGroupInfo]]:
    """Optimizer groups for the trainable parameters (frozen ones are left out)."""
    buckets: dict[tuple[str, bool, float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = group_of(name, post_group)
        scale = group_lr_scale.get(group, 1.0)
        if group == "vit" and vit_layer_decay != 1.0:
            scale *= layer_decay_scale(name, num_vit_layers, vit_layer_decay)
        no_decay = skips_weight_decay(name, param)
        buckets.setdefault((group, is_lora(name), scale, no_decay), []).append(param)
    groups, infos = [], []
    for (group, lora, scale, no_decay), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        wd = 0.0 if no_decay else weight_decay
        kind = "/lora" if lora else ""
        label = f"{group}{kind}/scale{scale:.4f}/{'no_decay' if no_decay else 'decay'}"
        groups.append({"params": params, "weight_decay": wd, "lr_scale": scale, "name": label})
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        infos.append(ParamGroupInfo(label, scale, wd, numel))
    return groups, infos


def build_optimizer(
    param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """torch AdamW (DeepSpeed's own Adam would compile ops on first use). `fused`: torch's
    single-kernel AdamW (CUDA and CPU) instead of the multi-tensor one; DeepSpeed steps it
    on its fp32 master partitions like any torch optimizer. Same update rule; results
    differ from the multi-tensor kernel in the last bits."""
    for g in param_groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps,
                             **({"fused": True} if fused else {}))


@contextmanager
def skipped_update(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, `optimizer.step()` does nothing: no parameter, moment or step count changes.

    Pass the torch optimizer DeepSpeed was given (`engine.basic_optimizer`): every wrapper
    (ZeRO 1-3, bf16/fp16) updates through its `step`, so an `engine.step()` inside still
    clips, zeroes the gradients and steps the schedule, but moves nothing (ZeRO copies its
    unchanged fp32 partitions back into the parameters)."""
    step = optimizer.step  # the bound method, or the LR scheduler's wrapper around it
    optimizer.step = lambda *args, **kwargs: None  # this instance only
    try:
        yield
    finally:
        optimizer.step = step


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> LambdaLR:
    """Each group's LR = schedule(step) * its lr_scale; the optimizer must come from
    `build_optimizer(lr=schedule.peak)`, whose groups start at peak * lr_scale."""
    return LambdaLR(optimizer, lambda step: schedule.lr(step) / schedule.peak)


def lr_by_module_group(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Max LR per module group (vit/adapter/llm) for logging."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        module_group = str(g.get("name", "all")).split("/")[0]
        out[module_group] = max(out.get(module_group, 0.0), float(g["lr"]))
    return out


def boundary_grad_norm(engine, par) -> torch.Tensor | None:
    """The global gradient norm before clipping, at the step boundary (after the last
    backward, before `engine.step()`), where DeepSpeed does not record one: ZeRO-0 in fp32
    clips through torch and drops the norm. There the gradients are already averaged over
    the data-parallel ranks, so this rank's norm is the global one. None on the other
    layouts (the engine's `get_global_grad_norm()` has it) and with tensor or pipeline
    parallelism (the shards' norms would need combining)."""
    if (engine.zero_optimization_stage() or engine.bfloat16_enabled()
            or engine.fp16_enabled() or par.sizes.tp > 1 or par.sizes.pp > 1):
        return None
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
             for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None
