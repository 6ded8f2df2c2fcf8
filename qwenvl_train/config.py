"""The structured schema of the Hydra config, and its validation before anything starts.

Hydra composes `configs/train.yaml` with one choice per group; `load_config` merges the
result onto the dataclass schema below (an unknown key or a value of the wrong type fails
there, naming the key) and then checks the allowed values of every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwenvl_train.data.config import TEMPLATES, DataConfig
from qwenvl_train.model.config import ExportConfig, QwenVLConfig
from qwenvl_train.model.groups import GROUPS
from qwenvl_train.training.parallel.config import ParallelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("bf16", "fp16", "fp32")


def cfg_get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """`a.b.c` lookup on dataclasses, DictConfigs and dicts alike."""
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        node = node.get(key, None) if isinstance(node, dict) else getattr(node, key, None)
    return default if node is None else node


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key."""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


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
        _positive(f"{prefix}.lr", self.lr)
        _positive(f"{prefix}.lr_multiplier", self.lr_multiplier)
        _positive(f"{prefix}.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr: {self.min_lr} exceeds lr {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: need two values in [0, 1), got {self.betas}")
        _positive(f"{prefix}.eps", self.eps)
        _positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
        _positive(f"{prefix}.grad_clip", self.grad_clip, allow_zero=True)
        _choice(f"{prefix}.schedule", self.schedule, ("cosine", "linear", "constant"))
        _positive(f"{prefix}.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 < self.vit_layer_decay <= 1:
            raise ConfigError(f"{prefix}.vit_layer_decay: must be in (0, 1]")
        for group, scale in self.group_lr_scale.items():
            _choice(f"{prefix}.group_lr_scale key", group, GROUPS)
            _positive(f"{prefix}.group_lr_scale.{group}", scale, allow_zero=True)


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
        _choice(f"{prefix}.template", self.template, TEMPLATES)
        if not self.trainable:
            raise ConfigError(f"{prefix}.trainable: at least one of {list(GROUPS)} must train")
        for group in self.trainable:
            _choice(f"{prefix}.trainable", group, GROUPS)
        _positive(f"{prefix}.image_size", self.image_size)
        _positive(f"{prefix}.seq_len", self.seq_len)
        _positive(f"{prefix}.global_batch_size", self.global_batch_size)
        _positive(f"{prefix}.micro_batch_size", self.micro_batch_size)
        _positive(f"{prefix}.steps", self.steps)
        _choice(f"{prefix}.precision", self.precision, PRECISIONS)
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(
                f"{prefix}.optim.warmup_steps: {self.optim.warmup_steps} exceeds "
                f"{prefix}.steps {self.steps}"
            )
        self.optim.validate(f"{prefix}.optim")


@dataclass
class TrackingConfig:
    backend: str = "wandb"
    mode: str = "offline"
    project: str = "qwenvl-train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    peak_tflops: float | None = None  # override the accelerator's peak for MFU

    def validate(self, prefix: str) -> None:
        _choice(f"{prefix}.backend", self.backend, ("wandb", "none"))
        _choice(f"{prefix}.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2

    def validate(self, prefix: str) -> None:
        _positive(f"{prefix}.every_steps", self.every_steps)
        _positive(f"{prefix}.keep_last", self.keep_last)


@dataclass
class TrainConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: QwenVLConfig = field(default_factory=QwenVLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run_dir: str = "runs/pretrain"
    seed: int = 1234
    init_from: str | None = None
    resume: str = "auto"
    log_every: int = 1
    nan_policy: str = "skip"
    max_consecutive_nan: int = 5
    export_at_end: bool = True

    def validate(self) -> None:
        self.stage.validate("stage")
        self.model.validate("model")
        self.data.validate("data")
        self.parallel.validate("parallel", self.model)
        self.tracking.validate("tracking")
        self.checkpoint.validate("checkpoint")
        self.export.validate("export")
        _choice("resume", self.resume, ("auto", "never"))
        _choice("nan_policy", self.nan_policy, ("skip", "stop"))
        _positive("log_every", self.log_every)
        _positive("max_consecutive_nan", self.max_consecutive_nan, allow_zero=True)
        if self.stage.image_size % self.model.vision.patch_size:
            raise ConfigError(
                f"stage.image_size: {self.stage.image_size} is not a multiple of "
                f"model.vision.patch_size {self.model.vision.patch_size}"
            )
        min_len = self.model.adapter.num_queries + 3
        if self.stage.seq_len < min_len:
            raise ConfigError(
                f"stage.seq_len: {self.stage.seq_len} cannot hold one image span "
                f"({self.model.adapter.num_queries} slots + markers) and a token"
            )


def to_schema(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config onto the schema and validate it (raises ConfigError)."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
        typed: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        detail = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{key}: {detail}") from None
    try:
        check_weights(typed)
        typed.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return typed


def check_weights(cfg: TrainConfig) -> None:
    """Sizes from the weight sources (`model.sizes=from_weights`), then every source checked
    against the model config: reads JSON and safetensors headers only, before anything is
    built (model/source_config.py)."""
    from qwenvl_train.model import source_config

    sizes = cfg.model.sizes
    cfg.model = source_config.resolve_model_sizes(cfg.model, cfg.init_from)
    problems = source_config.check_weight_sources(cfg.model, cfg.init_from)
    if problems:
        raise ConfigError(source_config.weight_source_error(problems, sizes))


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the Hydra config outside a Hydra app (tests, scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides or []))


def load_config(overrides: list[str] | None = None) -> TrainConfig:
    return to_schema(compose(overrides))
