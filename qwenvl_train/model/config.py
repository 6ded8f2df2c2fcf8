"""Model configuration: one small dataclass per component, mirroring `configs/model/*.yaml`.

Every class is an OmegaConf structured schema (plain types, Optional, nested dataclasses,
a default on every field). Defaults are the released Qwen-VL 9.6B (docs/recipe.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from qwenvl_train.model.groups import ADAPTER, VIT
from qwenvl_train.model.lora_config import LoRAConfig
from qwenvl_train.tokens import IMG_PAD_ID

# auto: flash_attention_2 on CUDA when flash_attn is installed, else flex on CUDA, else sdpa
# (model/attention.py:resolve_attn_implementation).
ATTN_IMPLEMENTATIONS = ("auto", "flex", "flash_attention_2", "sdpa", "eager")
CHUNKED_LOSS = ("auto", "true", "false")  # auto: on when the model trains on CUDA
POST_GROUPS = (VIT, ADAPTER)  # where adapter.ln_post/proj may belong (groups.py)
# config: the sizes below as written; from_weights: read from the weight sources' configs
# (model/source_config.py) before the model is built.
SIZES = ("config", "from_weights")
EXPORT_FORMATS = ("consolidated", "released", "hf_llm")


def _err(prefix: str, key: str, msg: str) -> ValueError:
    return ValueError(f"{prefix}.{key}: {msg}")


def _switch(value: Any) -> str:
    """auto/true/false from YAML: booleans arrive as bool, or as "True" via a str field."""
    return str(value).lower()


def _positive(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not value > 0:
            raise _err(prefix, key, f"must be > 0, got {value!r}")


@dataclass
class VisionConfig:
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_dim: int = 8192
    pos_grid: int = 16  # the learned position table is pos_grid x pos_grid, resized per input
    ln_eps: float = 1e-6

    def validate(self, prefix: str = "model.vision") -> None:
        _positive(self, prefix, "patch_size", "width", "layers", "heads", "mlp_dim", "pos_grid",
                  "ln_eps")
        if self.width % self.heads:
            raise _err(prefix, "heads",
                       f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class AdapterConfig:
    num_queries: int = 256  # image slots per image; a square grid
    embed_dim: int = 4096
    heads: int = 32
    post_group: str = "vit"  # module group of ln_post/proj: vit | adapter

    def validate(self, prefix: str = "model.adapter") -> None:
        _positive(self, prefix, "num_queries", "embed_dim", "heads")
        if math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise _err(prefix, "num_queries", f"must be a perfect square, got {self.num_queries}")
        if self.embed_dim % self.heads:
            raise _err(prefix, "heads",
                       f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        # The sin-cos table splits channels into 2 (column/row) x 2 (sin/cos) equal parts.
        if self.embed_dim % 4:
            raise _err(prefix, "embed_dim", f"must be divisible by 4, got {self.embed_dim}")
        if self.post_group not in POST_GROUPS:
            raise _err(prefix, "post_group",
                       f"must be one of {POST_GROUPS}, got {self.post_group!r}")


@dataclass
class LLMConfig:
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 151936
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False

    def validate(self, prefix: str = "model.llm") -> None:
        _positive(self, prefix, "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps",
                  "max_position_embeddings")
        if self.hidden_size % self.num_heads:
            raise _err(prefix, "num_heads",
                       f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise _err(prefix, "num_kv_heads",
                       f"num_heads {self.num_heads} is not divisible by num_kv_heads "
                       f"{self.num_kv_heads}")
        if self.vocab_size <= IMG_PAD_ID:
            raise _err(prefix, "vocab_size",
                       f"must exceed the <imgpad> id {IMG_PAD_ID}, got {self.vocab_size}")


@dataclass
class WeightsConfig:
    vit: str | None = None  # OpenCLIP ViT-bigG/14 checkpoint file (or a dir holding one)
    llm: str | None = None  # HF Qwen2/Qwen2.5 directory or a Qwen (v1) checkpoint directory
    qwenvl: str | None = None  # released Qwen-VL / Qwen-VL-Chat directory (whole model)

    def validate(self, prefix: str = "model.weights") -> None:
        for key in ("vit", "llm", "qwenvl"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise _err(prefix, key, f"must be a path string or null, got {value!r}")


@dataclass
class ExportConfig:
    """What a finished run writes under run_dir/export (model/export.py): `consolidated`
    (model.safetensors + config.json, our names; what init_from reads), `released` (the
    released Qwen-VL layout in export/released/), `hf_llm` (export/llm/, the LLM as a
    transformers directory with its tokenizer)."""

    formats: list[str] = field(default_factory=lambda: list(EXPORT_FORMATS))
    max_shard_gb: float = 2.0  # size of one safetensors shard of the released layout

    def validate(self, prefix: str = "export") -> None:
        for fmt in self.formats:
            if fmt not in EXPORT_FORMATS:
                raise _err(prefix, "formats", f"{fmt!r} is not a format; choose from "
                           f"{list(EXPORT_FORMATS)}")
        _positive(self, prefix, "max_shard_gb")


@dataclass
class GradCkptConfig:
    """Activation checkpointing per part; `*_every: k` checkpoints layers 0, k, 2k, ... only
    (selective: 1 = every layer, the most memory saved; larger k = less recompute)."""

    vit: bool = True
    llm: bool = True
    vit_every: int = 1
    llm_every: int = 1

    def validate(self, prefix: str = "model.gradient_checkpointing") -> None:
        for key in ("vit", "llm"):
            if not isinstance(getattr(self, key), bool):
                raise _err(prefix, key, "must be true or false")
        for key in ("vit_every", "llm_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _err(prefix, key, f"must be an integer >= 1, got {value!r}")

    def checkpointed(self, part: str, layer: int) -> bool:
        """Is layer `layer` of part `part` (vit | llm) recomputed in backward?"""
        return bool(getattr(self, part)) and layer % getattr(self, f"{part}_every") == 0


@dataclass
class QwenVLConfig:
    name: str = "qwenvl_7b"
    sizes: str = "config"  # config | from_weights
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    attn_implementation: str = "auto"  # auto | flex | flash_attention_2 | sdpa | eager
    chunked_loss: str = "auto"  # LM head + CE in token chunks: auto | true | false
    compile: bool = False  # torch.compile each ViT block and LLM decoder layer
    gradient_checkpointing: GradCkptConfig = field(default_factory=GradCkptConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # applied after the weights load

    def validate(self, prefix: str = "model") -> None:
        self.vision.validate(f"{prefix}.vision")
        self.adapter.validate(f"{prefix}.adapter")
        self.llm.validate(f"{prefix}.llm")
        self.gradient_checkpointing.validate(f"{prefix}.gradient_checkpointing")
        self.weights.validate(f"{prefix}.weights")
        if self.sizes not in SIZES:
            raise _err(prefix, "sizes", f"must be one of {SIZES}, got {self.sizes!r}")
        self.lora.validate(f"{prefix}.lora")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise _err(prefix, "attn_implementation",
                       f"must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if _switch(self.chunked_loss) not in CHUNKED_LOSS:
            raise _err(prefix, "chunked_loss",
                       f"must be one of {CHUNKED_LOSS}, got {self.chunked_loss!r}")
        if not isinstance(self.compile, bool):
            raise _err(prefix, "compile", f"must be true or false, got {self.compile!r}")
        # The adapter output overwrites LLM token embeddings, so the widths must agree.
        if self.adapter.embed_dim != self.llm.hidden_size:
            raise _err(prefix, "adapter.embed_dim",
                       f"must equal llm.hidden_size {self.llm.hidden_size}, "
                       f"got {self.adapter.embed_dim}")

    def uses_chunked_loss(self, on_cuda: bool) -> bool:
        """`chunked_loss` resolved: auto = on for CUDA training, off elsewhere."""
        choice = _switch(self.chunked_loss)
        return on_cuda if choice == "auto" else choice == "true"

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "model") -> QwenVLConfig:
        """Build from a dict or an OmegaConf DictConfig; unknown keys are an error."""
        if not isinstance(d, dict):
            from omegaconf import OmegaConf

            d = OmegaConf.to_container(d, resolve=True)
        return _build(cls, d, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise _err(prefix, unknown[0], f"unknown key; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise _err(prefix, name, f"must be a mapping, got {value!r}")
            value = _build(default, value, f"{prefix}.{name}")
        kwargs[name] = value
    return cls(**kwargs)
