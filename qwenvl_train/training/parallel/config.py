"""The `parallel` config group: ZeRO stage, pipeline and tensor sizes, extra DeepSpeed keys.

`ParallelConfig.validate` is the one place of every layout rule that holds whatever the world
size (ZeRO with pipelines and tensor parallelism, splits that must divide the model, keys
the stage config owns); `topology.validate_parallel` adds the world-size check at launch.
Torch-free, so validating a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenvl_train.model.config import QwenVLConfig

ZERO_STAGES = (0, 1, 2, 3)
# DeepSpeed keys generated from the stage config (engine.deepspeed_config).
DERIVED_DEEPSPEED_KEYS = ("optimizer", "train_batch_size", "gradient_accumulation_steps",
                          "train_micro_batch_size_per_gpu", "bf16", "fp16", "gradient_clipping")
# Model sizes tensor parallelism splits evenly across ranks (key under `model.`).
TP_SPLIT_KEYS = ("llm.num_heads", "llm.num_kv_heads", "llm.intermediate_size",
                 "vision.heads", "vision.mlp_dim")


GRAD_ACCUM_DTYPES = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    pp: int = 1
    tp: int = 1
    # Under bf16: the dtype DeepSpeed accumulates (and, with ZeRO, reduces) gradients in.
    # fp32 needs ZeRO >= 1 (engine.check_device_support).
    grad_accum_dtype: str = "fp32"
    # torch's fused (single-kernel) AdamW; off: the multi-tensor one (bitwise as before).
    fused_adamw: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self, prefix: str = "parallel", model: QwenVLConfig | None = None) -> None:
        """Raise ValueError naming the key; the rules that involve the model need `model`."""
        self._check_sizes(prefix)
        self._check_deepspeed(prefix)
        if model is not None:
            self._check_model(prefix, model)

    def _check_sizes(self, prefix: str) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"{prefix}.zero_stage: {self.zero_stage!r} is not allowed; "
                             f"choose one of {list(ZERO_STAGES)}")
        if self.grad_accum_dtype not in GRAD_ACCUM_DTYPES:
            raise ValueError(f"{prefix}.grad_accum_dtype: {self.grad_accum_dtype!r} is not "
                             f"allowed; choose one of {list(GRAD_ACCUM_DTYPES)}")
        if not isinstance(self.fused_adamw, bool):
            raise ValueError(f"{prefix}.fused_adamw: must be true or false, "
                             f"got {self.fused_adamw!r}")
        for key in ("pp", "tp"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        if self.pp > 1 and self.zero_stage != 1:
            # ZeRO-2/3 partition gradients, which the pipeline engine's own reduction cannot
            # handle; ZeRO-0 under a pipeline computes the clipping norm on the wrong group
            # and fails to reload bf16 checkpoints.
            raise ValueError(
                f"{prefix}.zero_stage: must be 1 with pipeline parallelism "
                f"({prefix}.pp={self.pp}), got {self.zero_stage}")
        if self.tp > 1 and self.zero_stage == 3:
            raise ValueError(
                f"{prefix}.zero_stage: 3 (partitioned parameters) is not supported with "
                f"tensor parallelism ({prefix}.tp={self.tp}); allowed: 0, 1, 2")

    def _check_deepspeed(self, prefix: str) -> None:
        if "scheduler" in self.deepspeed:
            raise ValueError(
                f"{prefix}.deepspeed.scheduler: a DeepSpeed-side scheduler would silently "
                "replace the stage's cosine schedule; set stage.optim instead")
        for key in DERIVED_DEEPSPEED_KEYS:
            if key in self.deepspeed:
                raise ValueError(
                    f"{prefix}.deepspeed.{key}: derived from the stage config; set it there")
        if "grad_accum_dtype" in dict(self.deepspeed.get("data_types") or {}):
            raise ValueError(f"{prefix}.deepspeed.data_types.grad_accum_dtype: set "
                             f"{prefix}.grad_accum_dtype instead")
        if "stage" in dict(self.deepspeed.get("zero_optimization") or {}):
            raise ValueError(f"{prefix}.deepspeed.zero_optimization.stage: set "
                             f"{prefix}.zero_stage instead (it decides how the model is built)")

    def _check_model(self, prefix: str, model: QwenVLConfig) -> None:
        layers = model.llm.num_layers
        if self.pp > layers:
            raise ValueError(f"{prefix}.pp: {self.pp} stages exceed model.llm.num_layers="
                             f"{layers}; allowed: 1..{layers}")
        if self.pp > 1 and model.llm.tie_word_embeddings:
            raise ValueError(
                f"{prefix}.pp: pipeline parallelism needs untied embeddings "
                "(model.llm.tie_word_embeddings=false): the embedding and the LM head live "
                "on different stages")
        if self.tp > 1:
            for key in TP_SPLIT_KEYS:
                section, name = key.split(".")
                value = getattr(getattr(model, section), name)
                if value % self.tp:
                    raise ValueError(
                        f"{prefix}.tp: {self.tp} does not divide model.{key}={value}; tensor "
                        "parallelism splits it evenly across ranks")
