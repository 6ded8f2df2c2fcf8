"""What a finished run writes (`export.formats`), and loading any of it back for inference.

  consolidated  export/model.safetensors + config.json   our names; `init_from` reads it
  released      export/released/   the released Qwen-VL layout (released.py): what the
                                   released code and Qwen-VL serving engines read;
                                   `model.weights.qwenvl` imports it
  hf_llm        export/llm/        the LLM alone as a transformers directory with its
                                   tokenizer (hf_export.py)

Every format is written from one full state dict in our names. LoRA: a run with adapters
hands `export_model` the MERGED state dict (the merge step sits in training/run.export,
between gathering the state and calling `export_model`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from qwenvl_train.model.config import GradCkptConfig, QwenVLConfig, WeightsConfig
from qwenvl_train.model.released import SEQ_LENGTH, export_released, released_layout_problem
from qwenvl_train.model.weights import cpu_tensors, write_consolidated
from qwenvl_train.tokens import IM_END_ID

log = logging.getLogger(__name__)

CONSOLIDATED, RELEASED, HF_LLM = "consolidated", "released", "hf_llm"
DEFAULT_IMAGE_SIZE = 448


def export_model(state: Mapping[str, torch.Tensor], config: QwenVLConfig, out_dir: str | Path,
                 formats: Iterable[str], *, chat: bool, image_size: int,
                 seq_length: int = SEQ_LENGTH, max_shard_gb: float = 2.0,
                 llm: nn.Module | None = None) -> dict[str, Path]:
    """Write `formats` of the full-model state dict `state` under `out_dir`; returns where
    each went. `chat`: a stage-sft model (stops on `<|im_end|>`). `llm`: a transformers LLM
    of this config to save `hf_llm` with (built on the meta device when not given)."""
    from qwenvl_train.model.hf_export import save_hf_llm

    formats = list(formats)
    out = Path(out_dir)
    tensors = cpu_tensors(state)
    paths: dict[str, Path] = {}
    if CONSOLIDATED in formats:
        write_consolidated(tensors, config, out)
        paths[CONSOLIDATED] = out
    if HF_LLM in formats:
        if llm is None:
            from qwenvl_train.model.qwenvl import build_model

            with torch.device("meta"):  # names and the LLM config only; no memory
                llm = build_model(config, image_size=image_size).llm
        paths[HF_LLM] = save_hf_llm(llm, tensors, out / "llm", chat=chat)
    if RELEASED in formats:
        problem = released_layout_problem(config)
        if problem:
            log.warning("export: the released layout is skipped: %s", problem)
        else:
            paths[RELEASED] = export_released(tensors, config, out / "released", chat=chat,
                                              image_size=image_size, seq_length=seq_length,
                                              max_shard_gb=max_shard_gb)
    return paths


# ---- loading an export ------------------------------------------------------------------------
def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_released(d: Path) -> bool:
    cfg = _json(d / "config.json")
    return cfg.get("model_type") == "qwen" and isinstance(cfg.get("visual"), dict)


def find_export(path: str | Path) -> tuple[str, Path]:
    """(`consolidated` | `released`, directory) for a run dir, its export dir, an
    export/released dir or a released Qwen-VL download."""
    p = Path(path)
    for d in (p, p / "export"):
        if (d / "model.safetensors").is_file() and (d / "config.json").is_file() \
                and not _is_released(d):
            return CONSOLIDATED, d
    for d in (p, p / RELEASED, p / "export" / RELEASED):
        if _is_released(d):
            return RELEASED, d
    raise FileNotFoundError(f"{p}: neither a consolidated export (model.safetensors + "
                            "config.json), a released-layout export nor a run directory "
                            "holding one")


def export_image_size(kind: str, d: Path) -> int:
    """The image size the model was exported at: the released config's `visual.image_size`,
    or the run's `stage.image_size` next to a consolidated export."""
    if kind == RELEASED:
        return int(_json(d / "config.json")["visual"]["image_size"])
    stage = _json(d.parent / "config.json").get("stage", {})
    return int(stage.get("image_size", DEFAULT_IMAGE_SIZE))


def is_chat_export(path: str | Path) -> bool:
    """Whether an export is a chat (stage-sft) model: the released generation config's
    `chat_format`, or `<|im_end|>` among the stop ids of export/llm."""
    kind, d = find_export(path)
    if kind == RELEASED:
        return _json(d / "generation_config.json").get("chat_format") == "chatml"
    eos = _json(d / "llm" / "generation_config.json").get("eos_token_id")
    return IM_END_ID in (eos if isinstance(eos, list) else [eos])


def export_config(path: str | Path) -> QwenVLConfig:
    """The model config of an export of either layout (the released one read through
    model/source_config.py, as `model.sizes=from_weights` does)."""
    from qwenvl_train.model.source_config import (
        resolve_model_sizes,
        weight_source_error,
        weight_source_problems,
    )

    kind, d = find_export(path)
    if kind == CONSOLIDATED:
        return QwenVLConfig.from_dict(_json(d / "config.json"))
    cfg = resolve_model_sizes(QwenVLConfig(sizes="from_weights",
                                           weights=WeightsConfig(qwenvl=str(d))))
    unreadable, mismatched = weight_source_problems(cfg)
    if unreadable or mismatched:
        raise ValueError(weight_source_error(unreadable, mismatched, sizes="from_weights"))
    cfg.weights = WeightsConfig()
    return cfg


def load_for_inference(path: str | Path, *, image_size: int | None = None,
                       device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[nn.Module, QwenVLConfig]:
    """An export of either layout (or a run dir, or a released Qwen-VL download) as an
    eval-mode `QwenVL` on `device` in `dtype`, and its config. `image_size` (the dummy
    image of text-only batches) defaults to the size it was exported at."""
    from qwenvl_train.model.qwenvl import build_model, restore_fp32_tables
    from qwenvl_train.model.weights import load_consolidated, load_qwenvl

    kind, d = find_export(path)
    cfg = export_config(d)
    cfg.gradient_checkpointing = GradCkptConfig(vit=False, llm=False)
    with torch.device(device):
        model = build_model(cfg, image_size=image_size or export_image_size(kind, d))
    (load_consolidated if kind == CONSOLIDATED else load_qwenvl)(model, d)
    log.info("loaded %s export %s", kind, d)
    model = model.to(dtype=dtype).eval()
    restore_fp32_tables(model)  # `.to(bf16)` rounds the fixed position tables too
    return model, cfg
