"""Evaluation: generation, output parsing, metrics and the shard-driven `evaluate`
(command line: `qwenvl-eval`, qwenvl_train/cli/eval.py)."""

from qwenvl_train.eval.generate import generate, generate_ids
from qwenvl_train.eval.metrics import (
    cider_d,
    exact_match,
    grounding_hit,
    iou,
    normalize_answer,
    vqa_score,
)
from qwenvl_train.eval.parse import box_to_pixels, denorm_coord, parse_boxes, parse_grounding
from qwenvl_train.eval.run_eval import EVAL_TASKS, evaluate, load_export

__all__ = [
    "EVAL_TASKS", "box_to_pixels", "cider_d", "denorm_coord", "evaluate", "exact_match",
    "generate", "generate_ids", "grounding_hit", "iou", "load_export", "normalize_answer",
    "parse_boxes", "parse_grounding", "vqa_score",
]
