"""Full (unpartitioned) weights out of a model that may be partitioned by ZeRO-3.

Gathering goes one parameter at a time so a 7B model never needs more than one full copy,
held on rank 0 only, and never a second one on the accelerator.
"""

from __future__ import annotations

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
