"""The whole training config: composes the component configs, checks the rules that span
components, and loads Hydra configs onto the schema.

Each component's dataclass lives beside the code it configures (torch-free):
  stage, stage.optim, checkpoint  training/config.py   (StageConfig, OptimConfig, CheckpointConfig)
  model                           model/config.py      (QwenVLConfig)
  data                            data/config.py       (DataConfig)
  tracking                        training/observe/config.py (TrackingConfig)
  parallel                        training/parallel/config.py (ParallelConfig)
Hydra composes `configs/train.yaml` onto `TrainConfig` (registered as `train_schema`, the
first entry of its defaults), so a YAML lists only what differs from the defaults, every
key can be overridden, and an unknown key or a value of the wrong type fails naming it;
`to_schema` then builds the typed object and runs every `validate`. Nothing here imports
torch, transformers or deepspeed: rejecting a bad override takes about a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwenvl_train.checks import ConfigError, choice, positive
from qwenvl_train.data.config import DataConfig
from qwenvl_train.model.config import ExportConfig, QwenVLConfig
from qwenvl_train.training.config import CheckpointConfig, StageConfig
from qwenvl_train.training.observe.config import TrackingConfig
from qwenvl_train.training.parallel.config import ParallelConfig

CONFIG_DIR = Path(__file__).parent / "configs"


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
    # Trainer callbacks to install: "pkg.module.Name" or {_target_: ..., kwargs} (callbacks.py)
    callbacks: list[Any] = field(default_factory=list)

    def validate(self) -> None:
        self.stage.validate("stage")
        self.model.validate("model")
        self.data.validate("data")
        self.parallel.validate("parallel", self.model)
        self.tracking.validate("tracking")
        self.checkpoint.validate("checkpoint")
        self.export.validate("export")
        choice("resume", self.resume, ("auto", "never"))
        choice("nan_policy", self.nan_policy, ("skip", "stop"))
        positive("log_every", self.log_every)
        positive("max_consecutive_nan", self.max_consecutive_nan, allow_zero=True)
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

    def to_dict(self) -> dict[str, Any]:
        """Every value, defaults included (run_dir/config.json, the W&B run config)."""
        return asdict(self)


def validate_launch(cfg: TrainConfig, world_size: int) -> int:
    """The checks that need the launch (world size, data on disk), still before any process
    group starts; returns the gradient accumulation steps."""
    # Imported here: topology imports ConfigError from this module.
    from qwenvl_train.training.parallel.topology import validate_parallel

    sizes = validate_parallel(cfg.parallel, world_size)
    accum = cfg.stage.grad_accumulation_steps(sizes.dp)
    root = Path(cfg.data.root)
    if not any(root.rglob("*.tar")):
        raise ConfigError(
            f"data.root: {str(root)!r} holds no shards (*.tar); build the demo set with "
            f"`qwenvl-data demo --out {root}`, or convert your data with `qwenvl-data "
            "convert` (data_recipes/README.md) and point data.root at it"
        )
    return accum


def to_schema(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config onto the schema and validate it (raises ConfigError)."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        # As plain containers: a key appended with `+` is then an unknown key here.
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=False)
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


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the Hydra config outside a Hydra app (tests, scripts); a bad override
    raises ConfigError as `to_schema` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=list(overrides or []))
    except HydraException as e:
        raise ConfigError(_hydra_message(e)) from None


def _hydra_message(error: BaseException) -> str:
    """`key: what is wrong` from the OmegaConf error under Hydra's, else Hydra's text."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return f"{cause.full_key}: {str(getattr(cause, 'msg', cause)).splitlines()[0]}"
        cause = cause.__cause__ or cause.__context__
    return str(error).strip()


def load_config(overrides: list[str] | None = None) -> TrainConfig:
    return to_schema(compose(overrides))
