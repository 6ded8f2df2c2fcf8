"""What the training loop is configured by: the stage (`configs/stage/*.yaml`), its
optimizer and schedule, and checkpointing. Torch-free, so a config validates quickly.

`OptimConfig`'s defaults are the paper's values shared by all three stages (AdamW betas,
eps, weight decay, gradient clipping, cosine schedule, ViT layer-wise decay); a stage YAML
sets only what differs: its learning rates and warmup (and layer decay in stage 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl_train.checks import ConfigError, choice, positive
from qwenvl_train.data.config import TEMPLATES
from qwenvl_train.model.groups import GROUPS

PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 500
    vit_layer_decay: float = 0.95
    group_lr_scale: dict[str, float] = field(
        default_factory=lambda: {"vit": 1.0, "adapter": 1.0, "llm": 1.0}
    )
    # Multiplies lr and min_lr together (schedule shape and stage ratios unchanged); for
    # models much narrower than the recipe's (the CPU demo), which need larger steps.
    lr_multiplier: float = 1.0

    @property
    def peak_lr(self) -> float:
        return self.lr * self.lr_multiplier

    @property
    def floor_lr(self) -> float:
        return self.min_lr * self.lr_multiplier

    def validate(self, prefix: str) -> None:
        positive(f"{prefix}.lr", self.lr)
        positive(f"{prefix}.lr_multiplier", self.lr_multiplier)
        positive(f"{prefix}.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr: {self.min_lr} exceeds lr {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: need two values in [0, 1), got {self.betas}")
        positive(f"{prefix}.eps", self.eps)
        positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        positive(f"{prefix}.grad_clip", self.grad_clip, allow_zero=True)
        choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        positive(f"{prefix}.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 < self.vit_layer_decay <= 1:
            raise ConfigError(f"{prefix}.vit_layer_decay: must be in (0, 1]")
        for group, scale in self.group_lr_scale.items():
            choice(f"{prefix}.group_lr_scale key", group, GROUPS)
            positive(f"{prefix}.group_lr_scale.{group}", scale, allow_zero=True)


@dataclass
class StageConfig:
    name: str = "pretrain"
    template: str = "pretrain"
    trainable: list[str] = field(default_factory=lambda: ["vit", "adapter"])
    image_size: int = 224
    seq_len: int = 512
    pack: bool = False
    global_batch_size: int = 30720
    micro_batch_size: int = 8
    steps: int = 50000
    precision: str = "bf16"
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, prefix: str) -> None:
        choice(f"{prefix}.template", self.template, TEMPLATES)
        if not self.trainable:
            raise ConfigError(f"{prefix}.trainable: at least one of {list(GROUPS)} must train")
        for group in self.trainable:
            choice(f"{prefix}.trainable", group, GROUPS)
        positive(f"{prefix}.image_size", self.image_size)
        positive(f"{prefix}.seq_len", self.seq_len)
        positive(f"{prefix}.global_batch_size", self.global_batch_size)
        positive(f"{prefix}.micro_batch_size", self.micro_batch_size)
        positive(f"{prefix}.steps", self.steps)
        choice(f"{prefix}.precision", self.precision, PRECISIONS)
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(
                f"{prefix}.optim.warmup_steps: {self.optim.warmup_steps} exceeds "
                f"{prefix}.steps {self.steps}"
            )
        self.optim.validate(f"{prefix}.optim")

    def grad_accumulation_steps(self, dp_size: int) -> int:
        """global batch = micro batch x accumulation x data-parallel size, exactly."""
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"stage.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"stage.micro_batch_size ({self.micro_batch_size}) x data-parallel size "
                f"({dp_size}) = {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2

    def validate(self, prefix: str) -> None:
        positive(f"{prefix}.every_steps", self.every_steps)
        positive(f"{prefix}.keep_last", self.keep_last)
