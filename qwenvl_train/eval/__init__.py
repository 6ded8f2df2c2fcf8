"""Evaluation: the task table (tasks.py), prompts and items (items.py), generation
(generate.py), output parsing (parse.py), metrics (metrics.py), the shard-driven `evaluate`
(run_eval.py; command line `qwenvl-eval`, qwenvl_train/cli/eval.py) and evaluation during
training (during_training.py, configured by the torch-free `EvalConfig` of config.py).

The names below are imported on first use (PEP 562), so that importing a light submodule
(`eval.tasks`, `eval.config`, `eval.metrics`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "generate": "generate", "generate_ids": "generate",
    "cider_d": "metrics", "exact_match": "metrics", "grounding_hit": "metrics",
    "iou": "metrics", "normalize_answer": "metrics", "token_f1": "metrics",
    "vqa_score": "metrics",
    "box_to_pixels": "parse", "denorm_coord": "parse", "parse_boxes": "parse",
    "parse_grounding": "parse",
    "evaluate": "run_eval", "load_export": "run_eval", "EVAL_TASKS": "tasks",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
