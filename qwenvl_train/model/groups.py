"""The one registry of module groups: which parameter belongs to `vit`, `adapter` or `llm`.

Freezing, optimizer parameter groups, ViT layer-wise LR decay, weight-decay exclusions,
pipeline placement and checkpoint conversion all ask this module, so a new parameter can
never silently escape a freeze list.

Naming contract of `QwenVL` (see `qwenvl.py`):
  vit.conv1, vit.positional_embedding, vit.ln_pre, vit.blocks.{i}.*      -> vit
  adapter.{query, pos_embed, kv_proj, ln_q, ln_kv, attn}.*               -> adapter
  adapter.{ln_post, proj}                                                -> `post_group`
  llm.*  (a transformers causal LM)                                      -> llm

`post_group` decides where the output LayerNorm and projection after the cross-attention
live. Default `vit`: the paper counts only the cross-attention as the 0.08B adapter, and the
released fine-tuning code froze `ln_post`/`proj` together with the ViT in stage 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qwenvl_train.model.config import GROUPS

ADAPTER_POST_PREFIXES: tuple[str, ...] = ("adapter.ln_post.", "adapter.proj")
_VIT_BLOCK = re.compile(r"^vit\.blocks\.(\d+)\.")
# Parameters that are positions or learned queries: never weight-decayed.
_NO_DECAY_NAMES = ("positional_embedding", "pos_embed", "adapter.query")


def _strip_wrappers(name: str) -> str:
    """Remove wrapper prefixes (DeepSpeed `module.`, torch.compile `_orig_mod.`)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def group_of(name: str, post_group: str = "vit") -> str:
    """Group of a parameter name; raises for a name outside the registry."""
    name = _strip_wrappers(name)
    if name.startswith(ADAPTER_POST_PREFIXES):
        return post_group
    for group in GROUPS:
        if name.startswith(group + "."):
            return group
    raise KeyError(f"parameter {name!r} belongs to no module group {GROUPS}")


def vit_layer_id(name: str, num_vit_layers: int) -> int:
    """Depth of a ViT-group parameter for layer-wise LR decay.

    0 = patch embedding, positions and ln_pre; i+1 = block i; num_layers+1 = anything after
    the blocks (ln_post/proj when they are in the vit group)."""
    name = _strip_wrappers(name)
    m = _VIT_BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(("vit.conv1", "vit.positional_embedding", "vit.ln_pre")):
        return 0
    return num_vit_layers + 1


def layer_decay_scale(name: str, num_vit_layers: int, decay: float) -> float:
    """LR multiplier decay**(depth_max - depth): the last block trains at the full rate."""
    return decay ** (num_vit_layers + 1 - vit_layer_id(name, num_vit_layers))


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, position tables and learned queries get no weight decay."""
    name = _strip_wrappers(name)
    return param.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES)



@dataclass
class GroupCount:
    total: int
    trainable: int


def set_trainable(model: nn.Module, trainable: Iterable[str], post_group: str = "vit") -> None:
    """requires_grad=True exactly for the parameters of the named groups."""
    trainable = set(trainable)
    unknown = trainable - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module group(s) {sorted(unknown)}; allowed: {GROUPS}")
    for name, param in model.named_parameters():
        param.requires_grad_(group_of(name, post_group) in trainable)


def _numel(param: torch.Tensor) -> int:
    # ZeRO-3 partitioned parameters keep their full size in `ds_numel`.
    return int(getattr(param, "ds_numel", param.numel()))


def count_by_group(model: nn.Module, post_group: str = "vit") -> dict[str, GroupCount]:
    counts = {g: GroupCount(0, 0) for g in GROUPS}
    for name, param in model.named_parameters():
        c = counts[group_of(name, post_group)]
        c.total += _numel(param)
        if param.requires_grad:
            c.trainable += _numel(param)
    return counts


def check_trainable_groups(
    model: nn.Module, trainable: Iterable[str], post_group: str = "vit"
) -> dict[str, GroupCount]:
    """Refuse a stage whose trainable group has no trainable parameter."""
    counts = count_by_group(model, post_group)
    empty = [g for g in trainable if counts[g].trainable == 0]
    if empty:
        raise ValueError(
            f"stage marks group(s) {empty} trainable but they have no trainable parameters; "
            f"counts: { {g: (c.total, c.trainable) for g, c in counts.items()} }"
        )
    return counts
