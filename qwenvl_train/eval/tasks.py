"""The evaluation tasks: what each reads from the shards, how it may prompt and how much it
may generate.

Torch-free, so that `qwenvl-eval --help` lists the tasks and `EvalConfig` validates without
loading the model stack.
"""

from __future__ import annotations

EVAL_TASKS = ("caption", "vqa", "grounding", "chat")
PROMPT_MODES = ("base", "chat")
# Record tasks each eval task reads.
RECORD_TASKS: dict[str, tuple[str, ...]] = {
    "caption": ("caption",), "vqa": ("vqa",), "grounding": ("grounding", "ref_grounding"),
    "chat": ("chat",)}
# Generation budgets per prompt mode: base as the official evaluation scripts; a chat-mode
# answer repeats the `<ref>` of a box, and a chat turn may be a sentence or two.
MAX_NEW_TOKENS = {"base": {"caption": 30, "vqa": 10, "grounding": 28, "chat": 64},
                  "chat": {"caption": 40, "vqa": 10, "grounding": 40, "chat": 64}}


def max_new_tokens_for(task: str, mode: str) -> int:
    return MAX_NEW_TOKENS[mode][task]
