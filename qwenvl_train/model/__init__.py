"""The Qwen-VL model: ViT -> position-aware adapter -> Qwen LLM, and its weight I/O."""

from qwenvl_train.model.config import (
    AdapterConfig,
    GradCkptConfig,
    LLMConfig,
    QwenVLConfig,
    VisionConfig,
    WeightsConfig,
)
from qwenvl_train.model.qwenvl import QwenVL, QwenVLOutput, build_model
from qwenvl_train.model.weights import (
    export_consolidated,
    load_consolidated,
    load_init_weights,
)

__all__ = [
    "AdapterConfig",
    "GradCkptConfig",
    "LLMConfig",
    "QwenVL",
    "QwenVLConfig",
    "QwenVLOutput",
    "VisionConfig",
    "WeightsConfig",
    "build_model",
    "export_consolidated",
    "load_consolidated",
    "load_init_weights",
]
