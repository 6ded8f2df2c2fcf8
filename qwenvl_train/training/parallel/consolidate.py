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
    for name, tensor in module.state_dict(keep_vars=True).items():
        if _is_partitioned(tensor):  # gather it for the copy
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                if rank == 0:
                    out[name] = tensor.detach().to("cpu", copy=True)
        elif rank == 0:
            out[name] = tensor.detach().to("cpu", copy=True)
    return out
