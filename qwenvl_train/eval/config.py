"""`EvalConfig`: the `eval` Hydra group -- evaluation during training (torch-free).

    eval=demo                         # configs/eval/demo.yaml: the demo set's val/ shards
    eval.every_steps=50 eval.max_items=64 eval.generation.prompt=chat
    '+eval.tasks={vqa: "val/vqa-*.tar"}'   # or name the tasks yourself

Each entry of `tasks` maps an eval task (`caption`, `vqa`, `grounding`, `chat`; eval/items.py
says which records each reads and how it prompts) to its held-out shards: brace patterns /
globs relative to `eval.root` (default `data.root`) or absolute, several separated by spaces. Every
`every_steps` steps and after the last one, the trainer reports per task the teacher-forced
validation loss (records the stage template renders) and the generation metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwenvl_train.checks import ConfigError, choice, positive
from qwenvl_train.eval.tasks import EVAL_TASKS, PROMPT_MODES


@dataclass
class EvalGenerationConfig:
    # auto: ChatML (chat) when the stage template is sft, else the paper's base prompts (base)
    prompt: str = "auto"
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: per task (eval/tasks.py MAX_NEW_TOKENS)
    # Chat-mode wording per task (caption / vqa / grounding), e.g. {grounding: "Find {expression}."}
    chat_prompts: dict[str, str] = field(default_factory=dict)


@dataclass
class EvalConfig:
    name: str = "none"
    root: str | None = None  # where `tasks.*.shards` start; None: data.root
    tasks: dict[str, str] = field(default_factory=dict)  # eval task -> shards; empty: off
    every_steps: int = 100  # also after the last step
    max_items: int = 32  # per task: eval items generated, records whose loss is measured
    loss: bool = True  # validation loss per task
    generate: bool = True  # generation metrics per task
    table_rows: int = 4  # samples per task in the W&B table (image, prompt, answer, reference)
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) and (self.loss or self.generate)

    def validate(self, prefix: str = "eval") -> None:
        for name, shards in self.tasks.items():
            if name not in EVAL_TASKS:
                raise ConfigError(f"{prefix}.tasks.{name}: unknown eval task; choose from "
                                  f"{list(EVAL_TASKS)}")
            if not shards.strip():
                raise ConfigError(f"{prefix}.tasks.{name}: needs a shard pattern, e.g. "
                                  f"'val/{name}-*.tar'")
        positive(f"{prefix}.every_steps", self.every_steps)
        positive(f"{prefix}.max_items", self.max_items)
        positive(f"{prefix}.table_rows", self.table_rows, allow_zero=True)
        gen = self.generation
        choice(f"{prefix}.generation.prompt", gen.prompt, ("auto", *PROMPT_MODES))
        positive(f"{prefix}.generation.batch_size", gen.batch_size)
        if gen.max_new_tokens is not None:
            positive(f"{prefix}.generation.max_new_tokens", gen.max_new_tokens)
        for task in gen.chat_prompts:
            choice(f"{prefix}.generation.chat_prompts key", task, ("caption", "vqa", "grounding"))

    def prompt_mode(self, template: str) -> str:
        """The prompt mode for a stage template (`auto`: chat for sft)."""
        if self.generation.prompt != "auto":
            return self.generation.prompt
        return "chat" if template == "sft" else "base"

    def shard_root(self, data_root: str) -> str:
        return self.root or data_root

    def check_shards(self, data_root: str, prefix: str = "eval") -> None:
        """Every task's pattern matches shards on disk (a launch check, before any process
        group starts)."""
        from qwenvl_train.data.reader import expand_shards

        root = self.shard_root(data_root)
        for name, shards in self.tasks.items():
            if not expand_shards(root, shards):
                where = f"eval.root={root!r}" if self.root else f"data.root={root!r}"
                raise ConfigError(
                    f"{prefix}.tasks.{name}: {shards!r} matches no .tar under "
                    f"{where}. The demo set writes its held-out shards to val/ (`qwenvl-data "
                    f"demo --out {Path(root)}`); point {prefix}.tasks.{name} at yours, "
                    f"or pass eval=none")
