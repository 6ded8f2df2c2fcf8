"""The released Qwen-VL layout, written: the exact inverse of `weights.load_qwenvl`.

`export/released/` holds what the released Qwen/Qwen-VL and Qwen/Qwen-VL-Chat repositories
ship, except their remote code:

  model-0000i-of-0000N.safetensors, model.safetensors.index.json   weights, released names
  config.json             model_type `qwen`, architectures QWenLMHeadModel, auto_map, the
                          Qwen v1 LLM fields and the `visual` dict
  generation_config.json  as the released models ship it (`chatml` for stage-sft exports,
                          `raw` for base models)
  qwen.tiktoken, tokenizer_config.json   the released tokenizer's files (QWenTokenizer)

The auto_map names the released code's modules (configuration_qwen.py, modeling_qwen.py,
visual.py, qwen_generation_utils.py, tokenization_qwen.py). We do not ship that code: with
`trust_remote_code=True`, transformers runs the released code once those files sit in the
directory (copy them from the released repository). `model.weights.qwenvl=export/released`
imports it back, bitwise.

Name mapping (ours -> released), the inverse of weights.convert_released_visual and
weights.convert_qwen_v1_llm: `vit.*` -> `transformer.visual.*` (blocks -> transformer.resblocks);
the adapter's cross-attention -> `transformer.visual.attn_pool.*`, ln_post/proj ->
`transformer.visual.{ln_post,proj}`; the LLM's q/k/v -> one fused `attn.c_attn` [Q | K | V],
the MLP's up -> `mlp.w1`, gate -> `mlp.w2` (v1 puts the SiLU on w2), down -> `mlp.c_proj`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenvl_train.data.tokenizer import default_vocab_file
from qwenvl_train.model import groups as G
from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.model.source_config import (
    RELEASED_LN_EPS,
    RELEASED_NUM_QUERIES,
    RELEASED_POOL_HEAD_DIM,
    RELEASED_POS_GRID,
    released_mlp_dim,
)
from qwenvl_train.model.weights import V1_LAYER_MODULES, V1_QKV, StateDict
from qwenvl_train.tokens import EOD_ID, IMG_START_ID

log = logging.getLogger(__name__)

VISUAL = "transformer.visual."
SEQ_LENGTH = 2048  # the released config's seq_length (inference scales attention beyond it)
_OURS_V1 = {ours: v1 for v1, ours in V1_LAYER_MODULES.items()}
_LAYER_PARAM = re.compile(rf"^{re.escape(G.LLM_LAYERS)}\.(\d+)\.(.+)\.(weight|bias)$")


# ---- what the layout and the released code can hold -------------------------------------------
def released_layout_problem(cfg: QwenVLConfig) -> str | None:
    """Why the layout cannot hold this model at all (None when it can)."""
    if cfg.llm.num_kv_heads != cfg.llm.num_heads:
        return (f"model.llm.num_kv_heads={cfg.llm.num_kv_heads} != num_heads "
                f"{cfg.llm.num_heads}: the released Qwen v1 layout fuses Q, K and V of equal "
                "width (no GQA)")
    return None


def released_code_gaps(cfg: QwenVLConfig, image_size: int) -> list[str]:
    """Where the released code (and vLLM's port of it) would not rebuild this model exactly,
    though the layout stores it and our importer reads it back exactly."""
    v, a = cfg.vision, cfg.adapter
    gaps = []
    if a.heads != a.embed_dim // RELEASED_POOL_HEAD_DIM:
        gaps.append(f"adapter heads {a.heads} (released code: output_dim // 128 = "
                    f"{a.embed_dim // RELEASED_POOL_HEAD_DIM})")
    if v.pos_grid != RELEASED_POS_GRID:
        gaps.append(f"vision pos_grid {v.pos_grid} (released code: 16)")
    if v.ln_eps != RELEASED_LN_EPS:
        gaps.append(f"vision ln_eps {v.ln_eps} (released code: 1e-6)")
    if (image_size // v.patch_size // 2) ** 2 != a.num_queries:
        gaps.append(f"{a.num_queries} image slots, but vLLM counts (image_size / patch / 2)^2 "
                    f"= {(image_size // v.patch_size // 2) ** 2} at image_size {image_size}")
    return gaps


def released_mlp_ratio(width: int, mlp_dim: int) -> float:
    """The shortest `mlp_ratio` the released rule int(width * ratio) turns back into mlp_dim
    (8192 / 1664 -> 4.9231, as released)."""
    for digits in range(4, 17):
        for ratio in (round(mlp_dim / width, digits), round((mlp_dim + 0.5) / width, digits)):
            if released_mlp_dim(width, ratio) == mlp_dim:
                return ratio
    raise ValueError(f"no mlp_ratio gives mlp_dim {mlp_dim} at width {width}")


# ---- names ---------------------------------------------------------------------------------
def _visual_name(name: str) -> str:
    """Our vit / adapter name -> released `transformer.visual.*` name."""
    blocks = G.local(G.VIT_BLOCKS) + "."
    if name.startswith(G.VIT + "."):
        local = G.local(name)
        if local.startswith(blocks):
            local = "transformer.resblocks." + local[len(blocks):]
        return VISUAL + local
    for ours, theirs in ((G.ADAPTER_LN_POST, "ln_post"), (G.ADAPTER_PROJ, "proj")):
        if name == ours or name.startswith(ours + "."):
            return VISUAL + theirs + name[len(ours):]
    return VISUAL + "attn_pool." + G.local(name)


def released_state_dict(state: Mapping[str, torch.Tensor], cfg: QwenVLConfig) -> StateDict:
    """Our full-model state dict -> the released names. Every tensor is placed or refused."""
    problem = released_layout_problem(cfg)
    if problem:
        raise ValueError(f"cannot write the released layout: {problem}")
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    kv_proj = f"{G.ADAPTER_KV_PROJ}.weight"
    for name, value in state.items():
        if name.startswith(G.LLM_ROTARY + "."):
            continue  # a recomputed buffer
        if name == kv_proj and cfg.vision.width == cfg.adapter.embed_dim and torch.equal(
                value, torch.eye(cfg.adapter.embed_dim, dtype=value.dtype)):
            continue  # released: kv_proj is an Identity when the widths agree (no tensor)
        if name.startswith((G.VIT + ".", G.ADAPTER + ".")):
            out[_visual_name(name)] = value
        elif name == f"{G.LLM_EMBED}.weight":
            out["transformer.wte.weight"] = value
        elif name.startswith(G.LLM_NORM + "."):
            out["transformer.ln_f" + name[len(G.LLM_NORM):]] = value
        elif name == f"{G.LLM_HEAD}.weight":
            out["lm_head.weight"] = value
        elif m := _LAYER_PARAM.match(name):
            layer, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in (G.LLM_LAYER.q, G.LLM_LAYER.k, G.LLM_LAYER.v):
                qkv.setdefault((layer, param), {})[module] = value
            elif module in _OURS_V1:
                out[f"transformer.h.{layer}.{_OURS_V1[module]}.{param}"] = value
            else:
                raise ValueError(f"{name}: no place for it in the released layout")
        else:
            raise ValueError(f"{name}: no place for it in the released layout")
    for (layer, param), parts in sorted(qkv.items()):
        fused = [parts[m] for m in (G.LLM_LAYER.q, G.LLM_LAYER.k, G.LLM_LAYER.v)]
        out[f"transformer.h.{layer}.{V1_QKV}.{param}"] = torch.cat(fused)
    return out


# ---- files ---------------------------------------------------------------------------------
def released_config(cfg: QwenVLConfig, image_size: int, torch_dtype: str,
                    seq_length: int = SEQ_LENGTH) -> dict:
    """config.json with the released fields; `visual` gets our keys (n_queries,
    attn_pool_heads, pos_grid, ln_eps) only where the model differs from the released code."""
    v, a, llm = cfg.vision, cfg.adapter, cfg.llm
    visual = {"heads": v.heads, "image_size": image_size, "image_start_id": IMG_START_ID,
              "layers": v.layers, "mlp_ratio": released_mlp_ratio(v.width, v.mlp_dim),
              "output_dim": a.embed_dim, "patch_size": v.patch_size, "width": v.width}
    if a.num_queries != RELEASED_NUM_QUERIES:
        visual["n_queries"] = a.num_queries
    if a.heads != a.embed_dim // RELEASED_POOL_HEAD_DIM:
        visual["attn_pool_heads"] = a.heads
    if v.pos_grid != RELEASED_POS_GRID:
        visual["pos_grid"] = v.pos_grid
    if v.ln_eps != RELEASED_LN_EPS:
        visual["ln_eps"] = v.ln_eps
    return {
        "architectures": ["QWenLMHeadModel"],
        "attn_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 2 * llm.intermediate_size,  # v1: w1 and w2 are each half of it
        "kv_channels": llm.hidden_size // llm.num_heads,
        "layer_norm_epsilon": llm.rms_norm_eps,
        "max_position_embeddings": llm.max_position_embeddings,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers,
        "onnx_safe": None,
        "rotary_emb_base": llm.rope_theta,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": torch_dtype,
        "transformers_version": version("transformers"),
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "visual": visual,
        "vocab_size": llm.vocab_size,
    }


def released_generation_config(chat: bool) -> dict:
    """Qwen-VL-Chat's generation_config.json; base models generate `raw` (stop on eod)."""
    return {"chat_format": "chatml" if chat else "raw", "do_sample": True,
            "eos_token_id": EOD_ID, "max_new_tokens": 512, "max_window_size": 6144,
            "pad_token_id": EOD_ID, "top_k": 0, "top_p": 0.3,
            "transformers_version": version("transformers")}


def write_released_tokenizer(out_dir: Path, max_length: int) -> None:
    """`qwen.tiktoken` (the BPE ranks our tokenizer reads) and the released
    tokenizer_config.json naming the released QWenTokenizer."""
    shutil.copyfile(default_vocab_file(), out_dir / "qwen.tiktoken")
    config = {"model_max_length": max_length, "tokenizer_class": "QWenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_sharded(tensors: Mapping[str, torch.Tensor], out_dir: Path,
                 max_shard_bytes: int) -> list[Path]:
    """`model-0000i-of-0000N.safetensors` of at most `max_shard_bytes` each (a bigger tensor
    gets a shard of its own) + `model.safetensors.index.json`."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        file = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file.name))
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def export_released(tensors: Mapping[str, torch.Tensor], cfg: QwenVLConfig,
                    out_dir: str | Path, *, chat: bool, image_size: int,
                    seq_length: int = SEQ_LENGTH, max_shard_gb: float = 2.0) -> Path:
    """Write the released layout of a full-model state dict (CPU tensors, our names)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    released = released_state_dict(tensors, cfg)
    gaps = released_code_gaps(cfg, image_size)
    kv_proj = VISUAL + "attn_pool.kv_proj.weight"
    if cfg.vision.width == cfg.adapter.embed_dim and kv_proj in released:
        gaps.append("a trained kv_proj between equal widths (released code: an Identity)")
    if gaps:
        log.warning("released layout in %s: our importer reads it back exactly, but the "
                    "released code would differ here: %s", out, "; ".join(gaps))
    for stale in out.glob("model-*-of-*.safetensors"):  # a re-export may shard differently
        stale.unlink()
    save_sharded(released, out, max_shard_bytes=math.ceil(max_shard_gb * 2**30))
    dtype = str(next(iter(released.values())).dtype).removeprefix("torch.")
    config = released_config(cfg, image_size, dtype, seq_length)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(released_generation_config(chat), indent=2) + "\n")
    write_released_tokenizer(out, max_length=cfg.llm.max_position_embeddings)
    return out
