"""Speed switches applied to a built QwenVL: activation checkpointing per part (every k-th
layer) and torch.compile of each ViT block and LLM decoder layer.

Both act per layer and in place (module objects and parameter names do not change), so
the group registry, the pipeline's layer slots, ZeRO-3's module hooks and checkpoints see
the same model. Compile wraps each layer's `forward`, not its `__call__`: module hooks
(ZeRO-3's parameter fetch) stay outside the compiled region.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from qwenvl_train.model.config import GradCkptConfig
    from qwenvl_train.model.qwenvl import QwenVL


def checkpoint_layers(model: QwenVL, cfg: GradCkptConfig) -> None:
    """Recompute in backward the ViT blocks / decoder layers `cfg` selects."""
    for i, block in enumerate(model.vit.blocks):
        block.gradient_checkpointing = cfg.checkpointed("vit", i)
    if not cfg.llm:
        return
    # transformers >= 5 renamed gradient_checkpointing_enable (now deprecated).
    enable = getattr(model.llm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.llm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(model.llm.model.layers):
        layer.gradient_checkpointing = cfg.checkpointed("llm", i)  # selective: every k-th


def compile_layers(model: QwenVL, backend: str = "inductor") -> list[nn.Module]:
    """torch.compile each ViT block's and decoder layer's forward; returns the layers."""
    import torch

    layers = [*model.vit.blocks, *model.llm.model.layers]
    for layer in layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
    return layers
