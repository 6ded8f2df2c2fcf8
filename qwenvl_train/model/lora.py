"""LoRA: low-rank adapters on the registry's linears, applied after the base weights load and
merged into them at export.

A LoRA linear computes  y = base(x) + dropout(x) A^T B^T * alpha/rank  with A [rank, in]
(Kaiming-uniform, as nn.Linear inits its weight) and B [out, rank] (zeros: training starts
from the base model's function). The adapted module keeps its own `weight`/`bias`, so every
name of the plain model is unchanged and the two matrices are new tensors
`{target}.lora_A` / `{target}.lora_B` (`groups.LORA_A/LORA_B`) of the same group. That is
what lets ZeRO-3 (it fetches a module's direct parameters around its forward), tensor
parallelism (`tensor_parallel.py` slices B like a column-parallel weight and A like a
row-parallel one), the pipeline (names map back by prefix) and every weight loader work
unchanged. Which targets, and what trains, is `lora_config.py`'s.

Adapting a module swaps its class for a cached subclass with the LoRA forward, in place, the
way `torch.nn.utils.parametrize` does: the module object, its parameters and any attribute a
wrapper set stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_train.model import groups
from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.model.lora_config import LoRAConfig

log = logging.getLogger(__name__)


class LoRAMixin:
    """Adds the low-rank update to a linear class's forward (nn.Linear or a tensor-parallel
    linear). A linear class that splits across tensor ranks defines `lora_hidden(h)`: how
    the rank-r activations cross ranks between A and B."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_update(x)  # type: ignore[misc]

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.lora_dropout(x), self.lora_A)
        hidden = getattr(self, "lora_hidden", None)
        if hidden is not None:
            h = hidden(h)
        return F.linear(h, self.lora_B) * self.lora_scale

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_rank={self.lora_A.shape[0]}, "  # type: ignore[misc]
                f"lora_scale={self.lora_scale:g}")


@functools.cache
def _lora_class(base: type) -> type:
    return type(f"LoRA{base.__name__}", (LoRAMixin, base), {"__module__": __name__})


def is_lora_linear(module: nn.Module) -> bool:
    return isinstance(module, LoRAMixin)


def attach_lora(linear: nn.Linear, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float,
                dropout: nn.Module) -> nn.Linear:
    """Make `linear` a LoRA linear with the given matrices (in place; returns it)."""
    if is_lora_linear(linear):
        raise ValueError(f"{linear} already carries LoRA matrices")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoRA adapts nn.Linear modules, got {type(linear).__name__}")
    setattr(linear, groups.LORA_A, lora_a)
    setattr(linear, groups.LORA_B, lora_b)
    linear.lora_dropout = dropout
    linear.lora_scale = scale
    linear.__class__ = _lora_class(type(linear))
    return linear


def add_lora(linear: nn.Linear, cfg: LoRAConfig, generator: torch.Generator | None = None
             ) -> nn.Linear:
    """New LoRA matrices on `linear` (whose weight may be ZeRO-3-partitioned: the shapes come
    from in_features/out_features), on its weight's device and dtype."""
    weight = linear.weight
    a = torch.empty(cfg.rank, linear.in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    b = torch.zeros(linear.out_features, cfg.rank)
    dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    return attach_lora(linear, nn.Parameter(a.to(weight.device, weight.dtype)),
                       nn.Parameter(b.to(weight.device, weight.dtype)), cfg.scale, dropout)


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int) -> list[str]:
    """Adapt every linear of `groups.lora_targets` for `cfg.targets`; returns the paths.

    Call it after the base weights are loaded (they are never touched) and before freezing
    and parallelizing. `seed` drives a private generator, so every rank draws the same A
    and the global RNG stream (dropout, data) is the same as without LoRA."""
    generator = torch.Generator().manual_seed(seed)
    paths = groups.lora_targets(model.config, cfg.targets)
    for path in paths:
        add_lora(model.get_submodule(path), cfg, generator)
    added = sum(p.numel() for n, p in model.named_parameters() if groups.is_lora(n))
    log.info("LoRA rank %d (alpha %g, dropout %g) on %d linears of %s: %s parameters",
             cfg.rank, cfg.alpha, cfg.dropout, len(paths), list(cfg.targets), f"{added:,}")
    return paths


def lora_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_lora_linear(m)}


# ---- merging (export) --------------------------------------------------------------------
@torch.no_grad()
def merge_lora_state_dict(state: Mapping[str, torch.Tensor], scale: float
                          ) -> dict[str, torch.Tensor]:
    """A state dict with LoRA matrices -> the plain model's: W += scale * B @ A (in fp32, then
    back to W's dtype) for every adapted linear; the LoRA tensors are dropped. Works on the
    full (gathered) state dict of any layout."""
    out = dict(state)
    suffix_a, suffix_b = f".{groups.LORA_A}", f".{groups.LORA_B}"
    for key in [k for k in state if k.endswith(suffix_a)]:
        prefix = key[: -len(suffix_a)]
        weight_key, b_key = f"{prefix}.weight", prefix + suffix_b
        if b_key not in out or weight_key not in out:
            raise KeyError(f"{key} has no matching {b_key} / {weight_key} to merge into")
        a, b, weight = out.pop(key).float(), out.pop(b_key).float(), out[weight_key]
        out[weight_key] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    orphans = [k for k in out if groups.is_lora(k)]
    if orphans:
        raise KeyError(f"LoRA tensors without their pair: {orphans[:4]}")
    return out


def merged_export(state: Mapping[str, torch.Tensor], model_cfg: QwenVLConfig
                  ) -> tuple[dict[str, torch.Tensor], QwenVLConfig]:
    """What a run exports: with LoRA on, the adapters merged into the base weights and a
    config without LoRA -- the plain model, loadable by everything that loads exports."""
    if not model_cfg.lora.enabled:
        return dict(state), model_cfg
    merged = merge_lora_state_dict(state, model_cfg.lora.scale)
    return merged, dataclasses.replace(model_cfg, lora=LoRAConfig())
