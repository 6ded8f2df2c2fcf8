"""The evaluation tasks: what each reads from the shards and how much it may generate.

Torch-free, so that `qwenvl-eval --help` lists the tasks without loading the model stack.
"""

from __future__ import annotations

EVAL_TASKS = ("caption", "vqa", "grounding")
# Record tasks each eval task reads.
RECORD_TASKS = {"caption": {"caption"}, "vqa": {"vqa"},
                "grounding": {"grounding", "ref_grounding"}}
# Generation budgets of the official evaluation scripts.
MAX_NEW_TOKENS = {"caption": 30, "vqa": 10, "grounding": 28}
