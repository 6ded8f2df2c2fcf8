"""The whole training config: composes the component configs, checks the rules that span
components, and loads Hydra configs onto the schema.

Each component's dataclass lives beside the code it configures (torch-free):
  stage, stage.optim, checkpoint  training/config.py   (StageConfig, OptimConfig, CheckpointConfig)
  model                           model/config.py      (QwenVLConfig)
  data                            data/config.py       (DataConfig)
  tracking                        training/observe/config.py (TrackingConfig)
  parallel                        training/parallel/config.py (ParallelConfig)
  eval                            eval/config.py       (EvalConfig)
Hydra composes `configs/train.yaml` onto `TrainConfig` (registered as `train_schema`, the
first entry of its defaults), so a YAML lists only what differs from the defaults, every
key can be overridden, and an unknown key or a value of the wrong type fails naming it;
`to_schema` then builds the typed object and runs every `validate`. Nothing here imports
torch, transformers or deepspeed: rejecting a bad override takes about a second.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from qwenvl_train.checks import ConfigError, choice, positive
from qwenvl_train.data.config import DataConfig
from qwenvl_train.data.reader import expand_sources
from qwenvl_train.eval.config import EvalConfig
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/pretrain"
    seed: int = 1234
    init_from: str | None = None
    resume: str = "auto"
    log_every: int = 1
    nan_policy: str = "skip"
    max_consecutive_nan: int = 5
    # After SIGTERM a rank must reach its next step boundary within this many seconds, else
    # it is blocked (in a collective whose peer died) and exits (training/failfast.py).
    stop_grace_s: float = 120.0
    export_at_end: bool = True
    # Trainer callbacks to install: "pkg.module.Name" or {_target_: ..., kwargs} (callbacks.py)
    callbacks: list[Any] = field(default_factory=list)

    def validate(self) -> None:
        self.stage.validate("stage")
        self.model.validate("model")
        self.data.validate("data")
        self.parallel.validate("parallel", self.model)
        self.model.lora.validate_for_run(self.stage.trainable, self.parallel.tp)
        self.tracking.validate("tracking")
        self.checkpoint.validate("checkpoint")
        self.export.validate("export")
        self.eval.validate("eval")
        choice("resume", self.resume, ("auto", "never"))
        choice("nan_policy", self.nan_policy, ("skip", "stop"))
        positive("log_every", self.log_every)
        positive("max_consecutive_nan", self.max_consecutive_nan, allow_zero=True)
        positive("stop_grace_s", self.stop_grace_s)
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
    from qwenvl_train.data.global_order import check_cover
    from qwenvl_train.data.selection import check_source_sizes
    from qwenvl_train.training.parallel.topology import validate_parallel

    sizes = validate_parallel(cfg.parallel, world_size)
    accum = cfg.stage.grad_accumulation_steps(sizes.dp)
    expand_sources(cfg.data)  # every source matches shards (one error lists those that don't)
    check_cover(cfg.data.virtual_streams, sizes.dp, cfg.data.num_workers)
    check_source_sizes(cfg.data, cfg.stage.template)
    cfg.eval.check_shards(cfg.data.root)
    from qwenvl_train.training.elastic import check_resume  # reads a checkpoint: torch
    from qwenvl_train.training.preflight import check_rerun

    check_rerun(cfg)  # first: the saved config.json against this one (model, seq_len, ...)
    check_resume(cfg, world_size)  # what a resume may change (README "Resuming")
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
        raise ConfigError(_omegaconf_message(e, cfg)) from None
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
    unreadable, mismatched = source_config.weight_source_problems(cfg.model, cfg.init_from)
    if unreadable or mismatched:
        raise ConfigError(source_config.weight_source_error(unreadable, mismatched, sizes))


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
    """One line naming the key: a config group option that does not exist (with the
    options), an unknown key (with the keys there are), the OmegaConf error under Hydra's,
    else Hydra's own text."""
    if isinstance(error, MissingConfigException) and error.options is not None:
        group, _, option = str(error.missing_cfg_file).rpartition("/")
        return (f"{group or 'config'}: {option!r} is not allowed; choose one of "
                f"{sorted(error.options)}")
    if isinstance(error, OverrideParseException):
        return (f"{str(error).splitlines()[0]}; quote values with braces, spaces or '=': "
                "'key=\"value\"'")
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return _omegaconf_message(cause)
        cause = cause.__cause__ or cause.__context__
    return str(error).strip().splitlines()[0]


def _omegaconf_message(error: OmegaConfBaseException, raw: Any = None) -> str:
    key = getattr(error, "full_key", None)
    detail = str(getattr(error, "msg", None) or error).splitlines()[0]
    env = re.search(r"Environment variable '(\w+)' not found", str(error))
    if env:  # `${oc.env:NAME}` in a YAML while NAME is unset: name the key it sets
        name = env.group(1)
        keys = _keys_using(raw, f"oc.env:{name}") or [key or "?"]
        return (f"{keys[0]}: the environment variable {name} is not set; "
                f"`export {name}=/path/...`, or pass {keys[0]}=/path/... on the command line")
    if key and isinstance(error, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key_message(key)
    if key and isinstance(error, MissingMandatoryValue):
        return f"{key}: has no default and must be set: {key}=..."
    return f"{key or '?'}: {detail}"


def _keys_using(node: Any, text: str, prefix: str = "") -> list[str]:
    """Dotted keys of a plain (unresolved) config whose string value contains `text`."""
    if isinstance(node, dict):
        return [k for name, v in node.items()
                for k in _keys_using(v, text, f"{prefix}.{name}" if prefix else str(name))]
    return [prefix] if isinstance(node, str) and text in node else []


def _schema_keys(cls: type | None = None, prefix: str = "") -> dict[str, type | None]:
    """Every dotted key of the schema (nested dataclasses opened) -> its dataclass or None."""
    out: dict[str, type | None] = {}
    hints = get_type_hints(cls or TrainConfig)
    for f in fields(cls or TrainConfig):
        key = f"{prefix}{f.name}"
        sub = hints[f.name] if is_dataclass(hints[f.name]) else None
        out[key] = sub
        if sub is not None:
            out.update(_schema_keys(sub, key + "."))
    return out


def _unknown_key_message(key: str) -> str:
    """`key` is in no schema: list the keys its parent has and the keys it may have meant."""
    parent, _, leaf = key.rpartition(".")
    schema = _schema_keys()
    if parent and schema.get(parent) is None:  # in a free-form dict (e.g. data.sources)
        return f"{key}: {parent} has no entry {leaf!r}; add one with '+{key}=...'"
    siblings = sorted(k.rpartition(".")[2] for k in schema if k.rpartition(".")[0] == parent)
    alike = [k for k in schema if k.rpartition(".")[2] == leaf]
    alike = alike or difflib.get_close_matches(key, list(schema), n=3)
    hint = f"; did you mean {' or '.join(alike)}?" if alike else ""
    return f"{key}: no such key; {parent or 'the config'} has {siblings}{hint}"


def load_config(overrides: list[str] | None = None) -> TrainConfig:
    return to_schema(compose(overrides))
