"""The vision tower: the released Qwen-VL ViT (OpenCLIP ViT-bigG/14 trunk without CLS).

Exactness (docs/recipe.md): conv patch embed without bias; a learned 16x16 position table that
is bicubic-resized (fp32, align_corners=False, no antialias) whenever the patch grid differs
and added before `ln_pre`; pre-LN blocks with exact GELU; LayerNorm eps from the config
(1e-6). The attention `in_proj` keeps the released per-head row layout `[q_h | k_h | v_h]`
so released weights copy 1:1 (OpenCLIP's `[Q; K; V]` is reordered on import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwenvl_train.data.images import CLIP_MEAN, CLIP_STD
from qwenvl_train.model.config import VisionConfig

# x_norm = x_uint8 * scale + shift per channel: (x / 255 - mean) / std as one multiply-add.
_CLIP_AFFINE = torch.tensor([[1.0 / (255.0 * s) for s in CLIP_STD],
                             [-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]])
_affine_on: dict[torch.device, torch.Tensor] = {}


def normalize_images(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A batch's images on their device -> the ViT's input in `dtype`.

    uint8 [N, 3, S, S] (what the data path ships) are CLIP-normalised in fp32 and then
    cast; float images (already normalised, e.g. by `data.images.load_image`) are only
    cast. The constants are copied to each device once: no host transfer per step."""
    if images.dtype != torch.uint8:
        return images.to(dtype)
    affine = _affine_on.get(images.device)
    if affine is None:
        affine = _affine_on[images.device] = _CLIP_AFFINE.to(images.device)
    scale, shift = affine[0].view(3, 1, 1), affine[1].view(3, 1, 1)
    return images.float().mul_(scale).add_(shift).to(dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics are fp32 for bf16/fp16 inputs on every device.

    CUDA's kernel already computes and keeps mean/rstd in fp32 for low-precision inputs;
    the CPU kernel returns (and saves for backward) them in the input's dtype, so on CPU
    a low-precision input is normalised in fp32 and the result cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) or x.is_cuda:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias,
                            self.eps).to(x.dtype)


def resize_pos_table(table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a square [G*G, C] table to [M, C] (M a square) like the released get_abs_pos."""
    src = round(table.shape[0] ** 0.5)
    tgt = round(num_tokens**0.5)
    if tgt * tgt != num_tokens:
        raise ValueError(f"cannot resize a {src}x{src} position table to {num_tokens} tokens")
    if src == tgt:
        return table
    grid = rearrange(table.float(), "(h w) c -> 1 c h w", h=src)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> (h w) c").to(table.dtype)


class ViTAttention(nn.Module):
    """Self-attention with a fused in_proj whose rows are grouped per head. All images of a
    batch have one size, so no mask: SDPA picks its fused (flash) kernel."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.in_proj(x), "b l (h three d) -> three b h l d", h=self.heads, three=3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class ViTBlock(nn.Module):
    gradient_checkpointing = False  # recompute this block in backward (model/speed.py)

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = ViTAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(cfg.width, cfg.mlp_dim))
        self.mlp.add_module("gelu", nn.GELU())  # exact (erf) GELU, as released
        self.mlp.add_module("c_proj", nn.Linear(cfg.mlp_dim, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """Images [N, 3, S, S] (uint8, or float already normalised) -> patch features
    [N, (S/p)^2, width], row-major patch order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.pos_grid**2, cfg.width))
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Same scale as the released init; the real run starts from OpenCLIP weights anyway.
        nn.init.normal_(self.positional_embedding, 0.0, self.cfg.width**-0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {p}")
        x = self.conv1(normalize_images(images, self.conv1.weight.dtype))
        x = rearrange(x, "n c h w -> n (h w) c")
        x = x + resize_pos_table(self.positional_embedding, x.shape[1]).to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            if block.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
