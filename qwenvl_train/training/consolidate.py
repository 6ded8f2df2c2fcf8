"""Full (unpartitioned) weights in and out of a model that may be partitioned by ZeRO-3.

Gathering goes one parameter at a time so a 7B model never needs more than one full copy,
held on rank 0 only, and never a second one on the accelerator.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with full tensors on CPU on rank 0 (empty on other ranks)."""
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if _is_partitioned(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        elif rank == 0:
            out[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        for name, buf in module.named_buffers():
            if _persistent(module, name):
                out[name] = buf.detach().to("cpu", copy=True)
    return out


def _persistent(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in owner._non_persistent_buffers_set


def load_full_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy full tensors into a model, partitioned or not; names and shapes must match."""
    import deepspeed

    expected = {n for n, _ in module.named_parameters()}
    expected |= {n for n, _ in module.named_buffers() if _persistent(module, n)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"weights do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            src = state[name]
            if _is_partitioned(param):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        _copy(name, param, src)
            else:
                _copy(name, param, src)
        for name, buf in module.named_buffers():
            if name in state:
                _copy(name, buf, state[name])


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
