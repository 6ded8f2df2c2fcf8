"""The position-aware VL adapter: one cross-attention from learned queries to ViT features.

Exactness (docs/recipe.md): x = ln_kv(kv_proj(x)); query = ln_q(query) + pos_embed (never
resized); key = x + pos_embed bicubic-resized to the kv grid; value = x; no residual, no
MLP; then `ln_post(out) @ proj` with proj shaped (in, out). The fixed 2D sin-cos table is a
persistent buffer: saved and loaded with the weights but never trained (a frozen Parameter
would be switched back on by `groups.set_trainable`); it stays fp32 under bf16 training
(`fp32_pos_embed_`, called through `qwenvl.restore_fp32_tables`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from qwenvl_train.model.config import AdapterConfig
from qwenvl_train.model.vision import LayerNorm, resize_pos_table


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] as [sin | cos], fp32 like the released numpy table."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).float() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim]: column encoding in the first half of the channels, row in the second."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class TruncNormalLinear(nn.Linear):
    """Linear with the released resampler init (trunc-normal 0.02, zero bias). The init runs
    inside nn.Linear.__init__, i.e. before `deepspeed.zero.Init` partitions the module."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention-compatible names (`in_proj_weight` = [Wq; Wk; Wv], `out_proj`).

    Own module rather than nn.MultiheadAttention because the latter reads `out_proj.weight`
    without calling `out_proj`, which ZeRO-3's per-module parameter fetch does not see."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = TruncNormalLinear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's own init of in_proj (kept by the released code). Each module
        # initializes only its direct parameters: zero.Init partitions at the end of __init__.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = (
            rearrange(F.linear(t, w, b), "n l (h d) -> n h l d", h=self.heads)
            for t, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "n h l d -> n l (h d)"))


class Adapter(nn.Module):
    """ViT features [N, T, width] -> [N, num_queries, embed_dim] LLM embeddings."""

    def __init__(self, cfg: AdapterConfig, kv_dim: int, ln_eps: float = 1e-6) -> None:
        super().__init__()
        dim, grid = cfg.embed_dim, math.isqrt(cfg.num_queries)
        self.query = nn.Parameter(torch.empty(cfg.num_queries, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid), persistent=True)
        self.kv_proj = TruncNormalLinear(kv_dim, dim, bias=False)
        self.ln_q = LayerNorm(dim, eps=ln_eps)
        self.ln_kv = LayerNorm(dim, eps=ln_eps)
        self.attn = CrossAttention(dim, cfg.heads)
        self.ln_post = LayerNorm(dim, eps=ln_eps)
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released init of the direct tensors: trunc-normal(0.02) query, proj ~ D^-0.5,
        and the fixed sin-cos table (recomputed, e.g. after `to_empty` of a meta model)."""
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.normal_(self.proj, 0.0, self.proj.shape[0] ** -0.5)
        table = sincos_2d(self.pos_embed.shape[1], math.isqrt(self.query.shape[0]))
        self.pos_embed.copy_(table.to(self.pos_embed.device))

    @torch.no_grad()
    def fp32_pos_embed_(self) -> None:
        """Keep the sin-cos table fp32: recompute it if something cast it (it is fixed)."""
        if self.pos_embed.dtype != torch.float32:
            table = sincos_2d(self.pos_embed.shape[1], math.isqrt(self.query.shape[0]))
            self.pos_embed = table.to(self.pos_embed.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Positions are added in fp32 (the table is fp32), then cast to the weights' dtype.
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query).float() + self.pos_embed.float()).to(x.dtype)
        k = (x.float() + resize_pos_table(self.pos_embed.float(), x.shape[1])).to(x.dtype)
        out = self.attn(q.expand(x.shape[0], -1, -1), k, x)
        return self.ln_post(out) @ self.proj
