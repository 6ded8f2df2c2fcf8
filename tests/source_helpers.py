"""Weight sources as users bring them, written small: an HF Qwen2 directory, an OpenCLIP
checkpoint (with or without open_clip_config.json), a released Qwen-VL directory (sharded,
with its config.json), and the released Qwen-VL-Chat config.json's values."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from model_helpers import released_ckpt, vit_trunk_ckpt
from safetensors.torch import save_file

from qwenvl_train.model.config import QwenVLConfig

# The released Qwen/Qwen-VL-Chat config.json (its values; the file itself is not ours).
RELEASED_CHAT_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0,
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "bf16": False, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
    "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True,
    "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16", "transformers_version": "4.32.0", "use_cache": True,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
               "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664},
    "vocab_size": 151936,
}


def save_hf_qwen2(out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, intermediate: int = 96, vocab: int = 151646,
                  tied: bool = True, seed: int = 0) -> Path:
    """A small Qwen2 directory as `save_pretrained` writes it (config.json + safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=tied, rope_theta=10000.0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    return out


def save_openclip(out: Path, cfg: QwenVLConfig, *, with_config: bool, seed: int = 0) -> Path:
    """An OpenCLIP ViT (visual.* + a text-tower key) in open_clip_model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    sd = {f"visual.{k}": v.contiguous() for k, v in vit_trunk_ckpt(cfg, gen, openclip=True).items()}
    sd["token_embedding.weight"] = torch.zeros(10, 8)
    save_file(sd, str(out / "open_clip_model.safetensors"))
    if with_config:
        v = cfg.vision
        vision_cfg = {"image_size": v.pos_grid * v.patch_size, "layers": v.layers,
                      "width": v.width, "head_width": v.width // v.heads,
                      "patch_size": v.patch_size, "mlp_ratio": v.mlp_dim / v.width}
        (out / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": {"embed_dim": 32, "vision_cfg": vision_cfg}, "preprocess_cfg": {}}))
    return out


def save_released(out: Path, cfg: QwenVLConfig, sd: dict | None = None, *, seed: int = 4,
                  config: dict | None = None) -> dict:
    """A released-layout checkpoint in two safetensors shards + index (+ a config.json when
    given); returns its tensors."""
    out.mkdir(parents=True, exist_ok=True)
    sd = sd if sd is not None else released_ckpt(cfg, torch.Generator().manual_seed(seed))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: sd[k].contiguous() for k in names}, str(out / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return sd
