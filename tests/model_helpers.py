"""Shared pieces of the model tests: tiny configs, random checkpoints in the released key
layouts, and independent reference computations written from the released model's math
(docs/recipe.md, "Where the released checkpoint differs"), deliberately not reusing any
code of `qwenvl_train.model`."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl_train.model.config import QwenVLConfig

IMG_PAD = 151859


def tiny_config(width: int = 48, vit_heads: int = 4, dim: int = 64, queries: int = 16,
                pool_heads: int = 4, vocab: int = 151936) -> QwenVLConfig:
    """A tiny model where ViT width != adapter width, so kv_proj is a real projection."""
    return QwenVLConfig.from_dict({
        "name": "test",
        "vision": {"patch_size": 14, "width": width, "layers": 2, "heads": vit_heads,
                   "mlp_dim": 4 * width, "pos_grid": 16, "ln_eps": 1e-6},
        "adapter": {"num_queries": queries, "embed_dim": dim, "heads": pool_heads},
        "llm": {"hidden_size": dim, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                "intermediate_size": 96, "vocab_size": vocab, "max_position_embeddings": 512},
        "gradient_checkpointing": {"vit": False, "llm": False},
    })


def _rand(*shape: int, std: float = 0.05, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _norm(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _rand(n, std=0.1, gen=gen), _rand(n, std=0.1, gen=gen)


def vit_trunk_ckpt(cfg: QwenVLConfig, gen: torch.Generator, *, openclip: bool) -> dict:
    """A random vision trunk; OpenCLIP (`in_proj_weight`, CLS, 257 positions) or released."""
    v = cfg.vision
    w = v.width
    sd = {"conv1.weight": _rand(w, 3, v.patch_size, v.patch_size, gen=gen),
          "positional_embedding": _rand(v.pos_grid**2 + int(openclip), w, std=0.3, gen=gen)}
    sd["ln_pre.weight"], sd["ln_pre.bias"] = _norm(w, gen)
    for i in range(v.layers):
        b = f"transformer.resblocks.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = _norm(w, gen)
        qkv_w, qkv_b = _rand(3 * w, w, std=0.15, gen=gen), _rand(3 * w, gen=gen)
        if openclip:
            sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = qkv_w, qkv_b
        else:
            sd[b + "attn.in_proj.weight"], sd[b + "attn.in_proj.bias"] = qkv_w, qkv_b
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = (
            _rand(w, w, std=0.15, gen=gen), _rand(w, gen=gen))
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = (
            _rand(v.mlp_dim, w, std=0.15, gen=gen), _rand(v.mlp_dim, gen=gen))
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = (
            _rand(w, v.mlp_dim, std=0.1, gen=gen), _rand(w, gen=gen))
    if openclip:
        sd["class_embedding"] = _rand(w, gen=gen)
        sd["ln_post.weight"], sd["ln_post.bias"] = _norm(w, gen)
        sd["proj"] = _rand(w, 32, gen=gen)
    return sd


def released_sincos(dim: int, grid: int) -> np.ndarray:
    """numpy transcription of the released get_2d_sincos_pos_embed (float32)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


def released_ckpt(cfg: QwenVLConfig, gen: torch.Generator) -> dict:
    """A random full Qwen-VL checkpoint in the released names (visual + Qwen v1 LLM)."""
    sd = {f"transformer.visual.{k}": t for k, t in
          vit_trunk_ckpt(cfg, gen, openclip=False).items()}
    d, w, q = cfg.adapter.embed_dim, cfg.vision.width, cfg.adapter.num_queries
    pool = {"query": _rand(q, d, std=0.5, gen=gen),
            "pos_embed": torch.from_numpy(released_sincos(d, math.isqrt(q))),
            "kv_proj.weight": _rand(d, w, std=0.15, gen=gen),
            "attn.in_proj_weight": _rand(3 * d, d, std=0.15, gen=gen),
            "attn.in_proj_bias": _rand(3 * d, gen=gen),
            "attn.out_proj.weight": _rand(d, d, std=0.15, gen=gen),
            "attn.out_proj.bias": _rand(d, gen=gen)}
    pool["ln_q.weight"], pool["ln_q.bias"] = _norm(d, gen)
    pool["ln_kv.weight"], pool["ln_kv.bias"] = _norm(d, gen)
    sd.update({f"transformer.visual.attn_pool.{k}": t for k, t in pool.items()})
    sd["transformer.visual.ln_post.weight"], sd["transformer.visual.ln_post.bias"] = _norm(d, gen)
    sd["transformer.visual.proj"] = _rand(d, d, std=d**-0.5, gen=gen)
    sd.update(qwen_v1_ckpt(cfg, gen))
    return sd


def qwen_v1_ckpt(cfg: QwenVLConfig, gen: torch.Generator) -> dict:
    c = cfg.llm
    h, f = c.hidden_size, c.intermediate_size
    sd = {"transformer.wte.weight": _rand(c.vocab_size, h, std=0.5, gen=gen),
          "transformer.ln_f.weight": _norm(h, gen)[0],
          "lm_head.weight": _rand(c.vocab_size, h, std=0.1, gen=gen)}
    for i in range(c.num_layers):
        b = f"transformer.h.{i}."
        sd[b + "ln_1.weight"], sd[b + "ln_2.weight"] = _norm(h, gen)[0], _norm(h, gen)[0]
        sd[b + "attn.c_attn.weight"] = _rand(3 * h, h, std=0.15, gen=gen)
        sd[b + "attn.c_attn.bias"] = _rand(3 * h, std=0.1, gen=gen)
        sd[b + "attn.c_proj.weight"] = _rand(h, h, std=0.1, gen=gen)
        sd[b + "mlp.w1.weight"] = _rand(f, h, std=0.15, gen=gen)
        sd[b + "mlp.w2.weight"] = _rand(f, h, std=0.15, gen=gen)
        sd[b + "mlp.c_proj.weight"] = _rand(h, f, std=0.1, gen=gen)
    return sd


# ---- independent references ---------------------------------------------------------------
def ref_abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(n)
    if src == tgt:
        return table
    x = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def _ln(x: torch.Tensor, sd: dict, name: str, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _patches(sd: dict, images: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    w = sd["conv1.weight"]
    x = F.conv2d(images, w, stride=w.shape[-1]).flatten(2).permute(0, 2, 1)
    return _ln(x + ref_abs_pos(pos, x.shape[1]), sd, "ln_pre")


def _mlp(x: torch.Tensor, sd: dict, b: str) -> torch.Tensor:
    h = _ln(x, sd, b + "ln_2")
    h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
    return x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]


def ref_openclip_trunk(sd: dict, images: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """OpenCLIP visual trunk without CLS, attention by nn.MultiheadAttention."""
    sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    x = _patches(sd, images, sd["positional_embedding"][1:])
    w = x.shape[-1]
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(w, heads, batch_first=True)
        mha.load_state_dict({k[len(b + "attn."):]: v for k, v in sd.items()
                             if k.startswith(b + "attn.")})
        h = _ln(x, sd, b + "ln_1")
        x = x + mha(h, h, h, need_weights=False)[0]
        x = _mlp(x, sd, b)
    return x


def ref_released_visual(sd: dict, images: torch.Tensor, cfg: QwenVLConfig) -> torch.Tensor:
    """The released visual forward: per-head fused in_proj (seq-first, scaled bmm), then the
    resampler with nn.MultiheadAttention, then ln_post and `@ proj`."""
    sd = {k[len("transformer.visual."):]: v for k, v in sd.items()
          if k.startswith("transformer.visual.")}
    heads = cfg.vision.heads
    x = _patches(sd, images, sd["positional_embedding"]).permute(1, 0, 2)  # LND
    sq, n, w = x.shape
    hd = w // heads
    for i in range(cfg.vision.layers):
        b = f"transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1")
        mixed = (h @ sd[b + "attn.in_proj.weight"].T + sd[b + "attn.in_proj.bias"])
        q, k, v = mixed.view(sq, n, heads, 3 * hd).split(hd, dim=-1)
        q, k, v = (t.reshape(sq, n * heads, hd).transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(torch.bmm(q / math.sqrt(hd), k.transpose(1, 2)), dim=-1)
        ctx = torch.bmm(probs, v).view(n, heads, sq, hd).permute(2, 0, 1, 3).reshape(sq, n, w)
        x = x + ctx @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        x = _mlp(x, sd, b)
    x = x.permute(1, 0, 2)
    pool = {k[len("attn_pool."):]: v for k, v in sd.items() if k.startswith("attn_pool.")}
    kv_pos = ref_abs_pos(pool["pos_embed"], x.shape[1])
    x = _ln(x @ pool["kv_proj.weight"].T, pool, "ln_kv").permute(1, 0, 2)
    mha = nn.MultiheadAttention(cfg.adapter.embed_dim, cfg.adapter.heads)
    mha.load_state_dict({k[len("attn."):]: v for k, v in pool.items() if k.startswith("attn.")})
    q = _ln(pool["query"], pool, "ln_q").unsqueeze(1).repeat(1, n, 1)
    out = mha(q + pool["pos_embed"].unsqueeze(1), x + kv_pos.unsqueeze(1), x,
              need_weights=False)[0].permute(1, 0, 2)
    return _ln(out, sd, "ln_post") @ sd["proj"]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def ref_qwen_v1_logits(sd: dict, cfg: QwenVLConfig, embeds: torch.Tensor) -> torch.Tensor:
    """Qwen (v1) decoder math: fused [Q|K|V] with bias, half-split rotary (base 10000, fp32
    tables), causal softmax attention, MLP c_proj(w1(x) * silu(w2(x))), RMSNorm in fp32."""
    c = cfg.llm
    heads, hd = c.num_heads, c.hidden_size // c.num_heads
    bsz, length, _ = embeds.shape
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(length).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rot(t: torch.Tensor) -> torch.Tensor:
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    causal = torch.full((length, length), float("-inf")).triu(1)
    x = embeds
    for i in range(c.num_layers):
        b = f"transformer.h.{i}."
        h = _rms(x, sd[b + "ln_1.weight"])
        qkv = h @ sd[b + "attn.c_attn.weight"].T + sd[b + "attn.c_attn.bias"]
        q, k, v = (t.view(bsz, length, heads, hd) for t in qkv.split(c.hidden_size, dim=-1))
        q, k = rot(q), rot(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, length, -1)
        x = x + att @ sd[b + "attn.c_proj.weight"].T
        h = _rms(x, sd[b + "ln_2.weight"])
        a1, a2 = h @ sd[b + "mlp.w1.weight"].T, h @ sd[b + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ sd[b + "mlp.c_proj.weight"].T
    return _rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def sample_ids(length: int, n_images: int, queries: int, gen: torch.Generator,
               start: int = 2) -> torch.Tensor:
    """Random text ids with `n_images` runs of `<img> + queries x <imgpad> + </img>`."""
    ids = torch.randint(0, 5000, (length,), generator=gen)
    pos = start
    for _ in range(n_images):
        ids[pos] = 151857
        ids[pos + 1: pos + 1 + queries] = IMG_PAD
        ids[pos + 1 + queries] = 151858
        pos += queries + 4
    assert pos <= length
    return ids
