"""Load a model to talk to from either export layout.

- ours (`run_dir/export`, written at the end of every stage): `model.safetensors` and a
  `config.json` holding our `QwenVLConfig` (`vision`, `adapter`, `llm`); a run directory
  works too (its `export/` is used);
- the released Qwen-VL layout (a Qwen-VL / Qwen-VL-Chat download, or an export to it):
  `config.json` with `model_type: qwen` and a `visual` sub-dict, weights named
  `transformer.visual.*`, `transformer.h.*`, `lm_head` (one file or a sharded index).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwenvl_train.chat.prompt import ChatError
from qwenvl_train.model.config import QwenVLConfig

DEFAULT_IMAGE_SIZE = 448  # stages 2 and 3


def released_config(cfg: dict) -> QwenVLConfig:
    """A released `config.json` -> our model config. The released code fixes what its
    config does not name: 256 queries, resampler heads = output_dim / 128, a 16x16
    position grid, LayerNorm eps 1e-6; `n_queries` and `resampler_heads` in `visual`
    override the first two (small test models)."""
    v = cfg["visual"]
    width, out_dim = int(v["width"]), int(v["output_dim"])
    return QwenVLConfig.from_dict({
        "name": str(cfg.get("_name_or_path") or "qwenvl"),
        "vision": {"patch_size": v["patch_size"], "width": width, "layers": v["layers"],
                   "heads": v["heads"], "mlp_dim": round(width * v["mlp_ratio"]),
                   "pos_grid": 16, "ln_eps": 1e-6},
        "adapter": {"num_queries": v.get("n_queries", 256), "embed_dim": out_dim,
                    "heads": v.get("resampler_heads", out_dim // 128)},
        "llm": {"hidden_size": cfg["hidden_size"], "num_layers": cfg["num_hidden_layers"],
                "num_heads": cfg["num_attention_heads"],
                "num_kv_heads": cfg["num_attention_heads"],
                # Qwen v1 counts both halves of the SwiGLU: the MLP width is half of it.
                "intermediate_size": cfg["intermediate_size"] // 2,
                "vocab_size": cfg["vocab_size"],
                "rope_theta": float(cfg.get("rotary_emb_base", 10000.0)),
                "rms_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-6)),
                "max_position_embeddings": cfg.get("max_position_embeddings", 8192),
                "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))},
        "gradient_checkpointing": {"vit": False, "llm": False},
    })


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """('ours' | 'released', directory); raises ChatError naming what is missing."""
    path = Path(path)
    if (path / "export" / "model.safetensors").is_file():  # a run directory
        path = path / "export"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ChatError(f"{path}: no config.json -- pass an export directory (run_dir/export, "
                        "or a released Qwen-VL / Qwen-VL-Chat directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ChatError(f"{cfg_file}: not JSON ({e})") from None
    if isinstance(cfg, dict) and cfg.get("model_type") == "qwen" and isinstance(
            cfg.get("visual"), dict):
        return "released", path
    if isinstance(cfg, dict) and {"vision", "adapter", "llm"} <= set(cfg):
        if not (path / "model.safetensors").is_file():
            raise ChatError(f"{path}: config.json is ours but model.safetensors is missing")
        return "ours", path
    raise ChatError(f"{cfg_file}: neither our export config (vision/adapter/llm) nor a "
                    "released Qwen-VL config (model_type qwen with a visual section)")


def load_for_chat(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  image_size: int | None = None):
    """Build and load the `QwenVL` of an export directory of either layout, in eval mode on
    `device` in `dtype`. Images are resized to `image_size` (default: the released config's
    `visual.image_size`, else 448)."""
    from qwenvl_train.eval.run_eval import load_export
    from qwenvl_train.model.qwenvl import build_model
    from qwenvl_train.model.weights import load_qwenvl

    layout, path = detect_layout(path)
    if layout == "ours":
        return load_export(path, image_size or DEFAULT_IMAGE_SIZE, device, dtype)
    cfg = json.loads((path / "config.json").read_text())
    try:
        model_cfg = released_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ChatError(f"{path}/config.json: cannot read the released config: {e}") from None
    size = image_size or int(cfg["visual"].get("image_size", DEFAULT_IMAGE_SIZE))
    model = build_model(model_cfg, size)
    load_qwenvl(model, path)
    return model.to(device=device, dtype=dtype).eval()
