"""The Qwen-VL model: ViT -> position-aware adapter -> Qwen LLM, and its weight I/O.

The names below load on first use, so the torch-free modules of this package (`config.py`,
`groups.py`) import without torch or transformers (config validation stays fast).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "AdapterConfig": "config",
    "GradCkptConfig": "config",
    "LLMConfig": "config",
    "QwenVLConfig": "config",
    "VisionConfig": "config",
    "WeightsConfig": "config",
    "ExportConfig": "config",
    "QwenVL": "qwenvl",
    "QwenVLOutput": "qwenvl",
    "build_model": "qwenvl",
    "export_consolidated": "weights",
    "export_model": "export",
    "load_for_inference": "export",
    "load_consolidated": "weights",
    "load_init_weights": "weights",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
