"""What the weight sources say about the model's sizes, read before anything is built.

Every source a run imports describes the sizes it was trained with:

  model.weights.llm      a Hugging Face directory's config.json: Qwen2 family (`qwen2`, also
                         Qwen1.5 / Qwen2.5) or Qwen v1 (`qwen`); without one, tensor shapes
  model.weights.qwenvl   the released Qwen-VL config.json (Qwen v1 fields + `visual`)
  model.weights.vit      an OpenCLIP checkpoint: its open_clip_config.json when present,
                         else the shapes of its tensors
  init_from              a consolidated export's config.json (our own schema)

Each becomes a list of `Fact`s about our config keys. `check_weight_sources` compares the
model config with them and returns every mismatch, each naming the override that fixes
it; `resolve_model_sizes` takes the sizes from them (`model.sizes=from_weights`).
`frozen_random_parts` says which frozen parts no source loads (issue 13 item 4).

No torch, no transformers: this reads JSON and safetensors headers; only a `.bin` checkpoint
without a config file is opened (memory-mapped) through torch, imported on demand.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenvl_train.model import groups as G
from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.tokens import IMG_PAD_ID, IMG_START_ID, MODEL_VOCAB_SIZE

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
OPENCLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# The released Qwen-VL code fixes these; the keys in brackets are ours, written into
# `visual` only when a model differs (the released code ignores unknown `visual` keys).
RELEASED_POS_GRID = 16  # positional_embedding is always 256 x width [pos_grid]
RELEASED_LN_EPS = 1e-6  # every LayerNorm of the vision tower [ln_eps]
RELEASED_POOL_HEAD_DIM = 128  # attn_pool heads = output_dim // 128 [attn_pool_heads]
RELEASED_NUM_QUERIES = 256  # `n_queries` default of the released VisionTransformer

# OpenCLIP's published head widths by ViT width (its model configs' `head_width`), for a
# checkpoint that comes without open_clip_config.json: heads are not in tensor shapes.
OPENCLIP_HEAD_WIDTH = {768: 64, 1024: 64, 1280: 80, 1408: 88, 1664: 104}


class SourceError(ValueError):
    """A weight source that cannot be read or is not supported; the message says why."""


@dataclass(frozen=True)
class Fact:
    """A size a source states: `key` under `model.` (e.g. `llm.hidden_size`), its value,
    where it was read, and whether our config must equal it (`strict`); a non-strict fact
    (vocab rows, which import fits; max positions) only feeds `from_weights`."""

    key: str
    value: Any
    where: str
    strict: bool = True


# ---- reading files -------------------------------------------------------------------------
def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read it as JSON ({e})") from None


def _config_beside(path: Path, name: str = CONFIG_FILE) -> Path | None:
    """`name` in the directory `path`, or next to the file `path`."""
    candidate = (path if path.is_dir() else path.parent) / name
    return candidate if candidate.is_file() else None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON); no tensor is read."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch  # only for pickled checkpoints; memory-mapped, so nothing is read

    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def weight_files(path: str | Path) -> list[Path]:
    """The files holding a checkpoint: the file itself, the shards of an index, or the one
    weights file of a directory (the same choice `weights.read_state_dict` makes)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(f"{path} does not exist")
    for name in INDEX_FILES:
        if (path / name).is_file():
            shards = set(_json(path / name).get("weight_map", {}).values())
            return [path / s for s in sorted(shards)]
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise SourceError(f"{path} holds none of {INDEX_FILES + WEIGHT_FILES}")


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        out.update(safetensors_shapes(file) if file.suffix == ".safetensors"
                   else _bin_shapes(file))
    return out


def resolve_init_from(path: str | Path) -> Path:
    """The consolidated export a stage starts from: an export dir, or a run dir's export."""
    path = Path(path)
    for candidate in (path, path / "export"):
        if (candidate / "model.safetensors").exists():
            return candidate
    raise FileNotFoundError(
        f"init_from={path}: no model.safetensors in it or in {path / 'export'}; point it at "
        "a finished stage's run_dir (exports at the end) or an export directory"
    )


# ---- facts per source ------------------------------------------------------------------------
def _at(file: Path, field: str, value: Any) -> str:
    return f"{file}: {field}={value}"


def _qwen2_facts(cfg: dict, file: Path, vocab_strict: bool) -> list[Fact]:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind != "default" or rope.get("rope_type", "default") != "default":
        raise SourceError(f"{file}: rope scaling {scaling or rope} is not supported (our LLM "
                          "uses plain RoPE)")
    if cfg.get("head_dim", hidden // heads) != hidden // heads:
        raise SourceError(f"{file}: head_dim={cfg['head_dim']} differs from hidden_size / "
                          "num_attention_heads, which our Qwen2 decoder assumes")
    tied = bool(cfg.get("tie_word_embeddings", False))
    kv = cfg.get("num_key_value_heads") or heads
    return [
        Fact("llm.hidden_size", hidden, _at(file, "hidden_size", hidden)),
        Fact("llm.num_layers", cfg["num_hidden_layers"],
             _at(file, "num_hidden_layers", cfg["num_hidden_layers"])),
        Fact("llm.num_heads", heads, _at(file, "num_attention_heads", heads)),
        Fact("llm.num_kv_heads", kv, _at(file, "num_key_value_heads", kv)),
        Fact("llm.intermediate_size", cfg["intermediate_size"],
             _at(file, "intermediate_size", cfg["intermediate_size"])),
        Fact("llm.rope_theta", float(theta), _at(file, "rope_theta", theta)),
        Fact("llm.rms_norm_eps", float(cfg["rms_norm_eps"]),
             _at(file, "rms_norm_eps", cfg["rms_norm_eps"])),
        # A tied source loads into an untied model (the head starts as the embedding); an
        # untied one into a tied model would lose its head.
        Fact("llm.tie_word_embeddings", tied, _at(file, "tie_word_embeddings", tied),
             strict=not tied),
        Fact("llm.vocab_size", cfg["vocab_size"], _at(file, "vocab_size", cfg["vocab_size"]),
             strict=vocab_strict),
        Fact("llm.max_position_embeddings", cfg["max_position_embeddings"],
             _at(file, "max_position_embeddings", cfg["max_position_embeddings"]), strict=False),
    ]


def _qwen_v1_facts(cfg: dict, file: Path, vocab_strict: bool) -> list[Fact]:
    """Qwen (v1): no GQA, w1/w2 each intermediate_size / 2 wide, RoPE over the full head."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("kv_channels", hidden // heads) * heads != hidden:
        raise SourceError(f"{file}: kv_channels={cfg['kv_channels']} x {heads} heads != "
                          f"hidden_size {hidden}; not a layout our decoder holds")
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise SourceError(f"{file}: rotary_pct={cfg['rotary_pct']}: only full-head RoPE "
                          "(1.0) is supported")
    if not cfg.get("no_bias", True):
        raise SourceError(f"{file}: no_bias=false (biased projections) is not supported")
    inter = cfg["intermediate_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    return [
        Fact("llm.hidden_size", hidden, _at(file, "hidden_size", hidden)),
        Fact("llm.num_layers", cfg["num_hidden_layers"],
             _at(file, "num_hidden_layers", cfg["num_hidden_layers"])),
        Fact("llm.num_heads", heads, _at(file, "num_attention_heads", heads)),
        Fact("llm.num_kv_heads", heads, f"{file}: Qwen v1 has no GQA (kv heads = "
             f"num_attention_heads={heads})"),
        Fact("llm.intermediate_size", inter // 2,
             f"{file}: intermediate_size={inter} / 2 (Qwen v1's w1 and w2 are each half)"),
        Fact("llm.rope_theta", float(cfg.get("rotary_emb_base", 10000)),
             _at(file, "rotary_emb_base", cfg.get("rotary_emb_base", 10000))),
        Fact("llm.rms_norm_eps", float(cfg.get("layer_norm_epsilon", 1e-6)),
             _at(file, "layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-6))),
        Fact("llm.tie_word_embeddings", tied, _at(file, "tie_word_embeddings", tied),
             strict=not tied),
        Fact("llm.vocab_size", cfg["vocab_size"], _at(file, "vocab_size", cfg["vocab_size"]),
             strict=vocab_strict),
        Fact("llm.max_position_embeddings", cfg.get("max_position_embeddings", 8192),
             _at(file, "max_position_embeddings", cfg.get("max_position_embeddings", 8192)),
             strict=False),
    ]


def _llm_config_facts(cfg: dict, file: Path, what: str) -> list[Fact]:
    kind = cfg.get("model_type")
    if kind == "qwen2":
        return _qwen2_facts(cfg, file, vocab_strict=False)
    if kind == "qwen":
        return _qwen_v1_facts(cfg, file, vocab_strict=False)
    raise SourceError(f"{what}: {file} has model_type {kind!r}; supported are 'qwen2' "
                      "(Qwen1.5, Qwen2, Qwen2.5) and 'qwen' (Qwen v1, Qwen-VL)")


_LAYER_INDEX = re.compile(r"^(?:transformer\.h|model\.layers)\.(\d+)\.")


def _llm_shape_facts(path: Path) -> list[Fact]:
    """Sizes a Qwen v1 or Qwen2 checkpoint without config.json shows in its tensor shapes
    (heads, RoPE base and norm eps are not among them)."""
    shapes = tensor_shapes(path)
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_INDEX.match(k))}
    for embed, up in (("transformer.wte.weight", "transformer.h.0.mlp.w1.weight"),
                      ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight")):
        if embed in shapes and up in shapes:
            where = f"{path} (tensor shapes; no {CONFIG_FILE})"
            vocab, hidden = shapes[embed]
            return [Fact("llm.hidden_size", hidden, f"{where}: {embed}"),
                    Fact("llm.num_layers", max(layers) + 1, f"{where}: {len(layers)} layers"),
                    Fact("llm.intermediate_size", shapes[up][0], f"{where}: {up}"),
                    Fact("llm.vocab_size", vocab, f"{where}: {embed}", strict=False)]
    raise SourceError(f"model.weights.llm: {path} has no {CONFIG_FILE} and no Qwen v1 "
                      "(transformer.*) or Qwen2 (model.*) embedding and MLP tensors")


def llm_facts(path: str | Path) -> list[Fact]:
    path = Path(path)
    file = _config_beside(path)
    if file is None:
        return _llm_shape_facts(path)
    return _llm_config_facts(_json(file), file, "model.weights.llm")


def released_mlp_dim(width: int, mlp_ratio: float) -> int:
    """The released code's MLP width: int(width * mlp_ratio) (1664 x 4.9231 -> 8192)."""
    return int(width * mlp_ratio)


def qwenvl_facts(path: str | Path) -> list[Fact]:
    """The released Qwen-VL config.json: the Qwen v1 LLM fields and the `visual` dict."""
    path = Path(path)
    file = _config_beside(path)
    if file is None:
        raise SourceError(f"model.weights.qwenvl: {path} has no {CONFIG_FILE} (a released "
                          "Qwen-VL download or a `released` export has one)")
    cfg = _json(file)
    visual = cfg.get("visual")
    if cfg.get("model_type") != "qwen" or not isinstance(visual, dict):
        raise SourceError(f"model.weights.qwenvl: {file} is not a Qwen-VL config (needs "
                          "model_type 'qwen' and a `visual` dict); for a text-only Qwen use "
                          "model.weights.llm")
    if visual.get("image_start_id", IMG_START_ID) != IMG_START_ID:
        raise SourceError(f"{file}: visual.image_start_id={visual['image_start_id']}, but our "
                          f"tokenizer's <img> is {IMG_START_ID}")
    facts = _qwen_v1_facts(cfg, file, vocab_strict=False)
    width, out_dim = visual["width"], visual["output_dim"]
    ratio = visual["mlp_ratio"]

    def v(key: str, field: str, value: Any, rule: str = "") -> Fact:
        return Fact(key, value, f"{file}: visual.{field}={value}{rule}")

    pool_heads = visual.get("attn_pool_heads", out_dim // RELEASED_POOL_HEAD_DIM)
    facts += [
        v("vision.width", "width", width),
        v("vision.layers", "layers", visual["layers"]),
        v("vision.heads", "heads", visual["heads"]),
        v("vision.patch_size", "patch_size", visual["patch_size"]),
        Fact("vision.mlp_dim", released_mlp_dim(width, ratio),
             f"{file}: int(visual.width x visual.mlp_ratio) = int({width} x {ratio})"),
        v("vision.pos_grid", "pos_grid", visual.get("pos_grid", RELEASED_POS_GRID),
          "" if "pos_grid" in visual else " (released code: a 16x16 table)"),
        v("vision.ln_eps", "ln_eps", visual.get("ln_eps", RELEASED_LN_EPS),
          "" if "ln_eps" in visual else " (released code)"),
        v("adapter.embed_dim", "output_dim", out_dim),
        v("adapter.num_queries", "n_queries", visual.get("n_queries", RELEASED_NUM_QUERIES),
          "" if "n_queries" in visual else " (released default)"),
        Fact("adapter.heads", pool_heads,
             f"{file}: visual.attn_pool_heads={pool_heads}" if "attn_pool_heads" in visual
             else f"{file}: visual.output_dim // 128 = {pool_heads} (released code)"),
    ]
    return facts


def _openclip_prefix(shapes: dict[str, tuple[int, ...]]) -> str:
    for prefix in ("module.visual.", "visual.", "module.", ""):
        if f"{prefix}conv1.weight" in shapes:
            return prefix
    raise SourceError("no OpenCLIP vision tower in it (no visual.conv1.weight)")


def openclip_facts(path: str | Path) -> list[Fact]:
    """An OpenCLIP checkpoint's vision tower: open_clip_config.json `model_cfg.vision_cfg`
    when present; else the tensor shapes plus OpenCLIP's head width for that ViT width."""
    path = Path(path)
    file = _config_beside(path, OPENCLIP_CONFIG_FILE)
    if file is not None:
        vcfg = _json(file).get("model_cfg", {}).get("vision_cfg")
        if not isinstance(vcfg, dict):
            raise SourceError(f"model.weights.vit: {file} has no model_cfg.vision_cfg")
        width, patch = vcfg["width"], vcfg["patch_size"]
        head_width = vcfg.get("head_width", 64)
        ratio = vcfg.get("mlp_ratio", 4.0)
        image = vcfg.get("image_size", 224)
        image = image[0] if isinstance(image, (list, tuple)) else image
        return [
            Fact("vision.width", width, _at(file, "vision_cfg.width", width)),
            Fact("vision.layers", vcfg["layers"], _at(file, "vision_cfg.layers", vcfg["layers"])),
            Fact("vision.heads", width // head_width,
                 f"{file}: vision_cfg.width / head_width = {width} / {head_width}"),
            Fact("vision.patch_size", patch, _at(file, "vision_cfg.patch_size", patch)),
            Fact("vision.mlp_dim", int(width * ratio),
                 f"{file}: int(vision_cfg.width x mlp_ratio) = int({width} x {ratio})"),
            Fact("vision.pos_grid", image // patch,
                 f"{file}: vision_cfg.image_size / patch_size = {image} / {patch}"),
        ]
    files = weight_files(path)
    shapes = tensor_shapes(path)
    try:
        prefix = _openclip_prefix(shapes)
    except SourceError as e:
        raise SourceError(f"model.weights.vit: {files[0]}: {e}") from None
    where = f"{files[0]} (tensor shapes; no {OPENCLIP_CONFIG_FILE})"
    width, _, patch, _ = shapes[f"{prefix}conv1.weight"]
    rows = shapes[f"{prefix}positional_embedding"][0] - 1  # row 0: the class token
    block = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in shapes if (m := block.match(k))}
    facts = [
        Fact("vision.width", width, f"{where}: conv1.weight"),
        Fact("vision.patch_size", patch, f"{where}: conv1.weight"),
        Fact("vision.layers", len(layers), f"{where}: {len(layers)} resblocks"),
        Fact("vision.mlp_dim", shapes[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"][0],
             f"{where}: mlp.c_fc.weight"),
        Fact("vision.pos_grid", math.isqrt(rows), f"{where}: positional_embedding"),
    ]
    if width in OPENCLIP_HEAD_WIDTH:
        facts.append(Fact("vision.heads", width // OPENCLIP_HEAD_WIDTH[width],
                          f"{where}: OpenCLIP's head width {OPENCLIP_HEAD_WIDTH[width]} for "
                          f"width {width}"))
    return facts


def export_facts(path: str | Path) -> list[Fact]:
    """A consolidated export (init_from): every size of its config.json must match."""
    export = resolve_init_from(path)
    file = export / CONFIG_FILE
    saved = QwenVLConfig.from_dict(_json(file))
    facts = []
    for part in ("vision", "adapter", "llm"):
        for key, value in vars(getattr(saved, part)).items():
            if (part, key) != ("adapter", "post_group"):  # a stage choice, not a size
                facts.append(Fact(f"{part}.{key}", value, _at(file, f"{part}.{key}", value)))
    return facts


# ---- all sources of a run --------------------------------------------------------------------
def _sources(model_cfg: QwenVLConfig, init_from: str | None
             ) -> list[tuple[str, str, Callable[[str], list[Fact]]]]:
    """(override key, path, reader) in load order: later sources overwrite earlier ones."""
    if init_from:  # init_from replaces every other weight source (training/run.py)
        return [("init_from", init_from, export_facts)]
    w = model_cfg.weights
    out = [("model.weights.qwenvl", w.qwenvl, qwenvl_facts),
           ("model.weights.vit", w.vit, openclip_facts),
           ("model.weights.llm", w.llm, llm_facts)]
    return [s for s in out if s[1]]


def source_facts(model_cfg: QwenVLConfig, init_from: str | None = None
                 ) -> tuple[list[Fact], list[str]]:
    """Every fact of every source, and the problems of the sources that could not be read."""
    facts: list[Fact] = []
    problems: list[str] = []
    for key, path, reader in _sources(model_cfg, init_from):
        if not Path(path).exists():
            problems.append(f"{key}={path}: no such file or directory")
            continue
        try:
            facts += reader(path)
        except (SourceError, FileNotFoundError) as e:
            problems.append(str(e))
        except (KeyError, TypeError, ValueError) as e:  # a config missing a field we need
            problems.append(f"{key}={path}: cannot read its sizes ({type(e).__name__}: {e})")
    return facts, problems


def _get(cfg: QwenVLConfig, key: str) -> Any:
    part, field = key.split(".")
    return getattr(getattr(cfg, part), field)


def _set(cfg: QwenVLConfig, key: str, value: Any) -> None:
    part, field = key.split(".")
    setattr(getattr(cfg, part), field, value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def weight_source_problems(model_cfg: QwenVLConfig, init_from: str | None = None
                           ) -> tuple[list[str], list[str]]:
    """(unreadable, mismatched): the sources that cannot be read or are not supported, and
    every size that differs from the model config, as `model.KEY=VALUE (where; yours:
    OURS)`. Both empty when the model can be built and every source loads into it."""
    facts, unreadable = source_facts(model_cfg, init_from)
    mismatched = []
    for fact in facts:
        ours = _get(model_cfg, fact.key)
        if fact.strict and not _same(ours, fact.value):
            mismatched.append(f"model.{fact.key}={fact.value} ({fact.where}; yours: {ours})")
    return unreadable, mismatched


def check_weight_sources(model_cfg: QwenVLConfig, init_from: str | None = None) -> list[str]:
    """Both kinds of `weight_source_problems` in one list."""
    unreadable, mismatched = weight_source_problems(model_cfg, init_from)
    return unreadable + mismatched


def weight_source_error(unreadable: Iterable[str], mismatched: Iterable[str],
                        sizes: str = "config") -> str:
    """The one message for `weight_source_problems`: a source that cannot be read is named
    as such; only size mismatches suggest taking the sizes from the weights."""
    parts = []
    if unreadable:
        parts.append("cannot read the weight source(s):\n  " + "\n  ".join(unreadable))
    if mismatched:
        hint = ("" if sizes == "from_weights" else
                "\nor take every size from the weights: model.sizes=from_weights "
                "(or model=from_weights; the released Qwen-VL 7B is model=qwenvl_7b)")
        parts.append("the model config does not match its weight sources; set\n  "
                     + "\n  ".join(mismatched) + hint)
    return "\n".join(parts)


def resolve_model_sizes(model_cfg: QwenVLConfig, init_from: str | None = None) -> QwenVLConfig:
    """`model.sizes=from_weights`: a copy of the config with every size its sources state
    (later sources win, in load order); unchanged otherwise. The adapter width follows the
    LLM when no source states it. Unreadable sources are left to `check_weight_sources`."""
    if model_cfg.sizes != "from_weights":
        return model_cfg
    if not _sources(model_cfg, init_from):
        raise ValueError("model.sizes=from_weights: no weight source to read the sizes from; "
                         "set model.weights.qwenvl, model.weights.vit / model.weights.llm or "
                         "init_from")
    facts, _ = source_facts(model_cfg, init_from)
    out = copy.deepcopy(model_cfg)
    out.sizes = "config"  # the sizes are explicit now (exports record them so)
    for fact in facts:
        value = fact.value
        if fact.key == "llm.vocab_size" and value <= IMG_PAD_ID:
            value = MODEL_VOCAB_SIZE  # a plain Qwen vocab: import adds the Qwen-VL tokens
        _set(out, fact.key, value)
    stated = {f.key for f in facts}
    if "adapter.embed_dim" not in stated:
        out.adapter.embed_dim = out.llm.hidden_size
    changed = [f"{k}={_get(out, k)}" for k in sorted(stated) if _get(out, k) != _get(model_cfg, k)]
    if changed:
        log.info("model sizes from the weights: %s", ", ".join(changed))
    return out


# ---- frozen parts that no weights reach (issue 13 item 4) ------------------------------------
_PART_SOURCES = {  # which weight sources hold each part (init_from holds all)
    "vit": ("vit", "qwenvl"),
    "adapter": ("qwenvl",),
    G.POST_PART: ("qwenvl",),
    "llm": ("llm", "qwenvl"),
}
_PART_FIX = {
    "vit": "model.weights.vit=OPENCLIP_CHECKPOINT, model.weights.qwenvl=DIR or init_from=RUN",
    "adapter": "model.weights.qwenvl=DIR or init_from=RUN",
    G.POST_PART: "model.weights.qwenvl=DIR or init_from=RUN (ln_post/proj after the adapter)",
    "llm": "model.weights.llm=HF_DIR, model.weights.qwenvl=DIR or init_from=RUN",
}


def loaded_parts(model_cfg: QwenVLConfig, init_from: str | None = None) -> set[str]:
    """Parts (`groups.PARTS`) that some weight source of the run loads."""
    if init_from:
        return set(G.PARTS)
    w = model_cfg.weights
    return {p for p, keys in _PART_SOURCES.items() if any(getattr(w, k) for k in keys)}


def frozen_random_parts(model_cfg: QwenVLConfig, trainable: Iterable[str],
                        init_from: str | None = None) -> list[str]:
    """Frozen parts no weights reach: they would stay at their random init all run."""
    trainable = set(trainable)
    loaded = loaded_parts(model_cfg, init_from)
    post = model_cfg.adapter.post_group
    return [p for p in G.PARTS if G.part_group(p, post) not in trainable and p not in loaded]


def frozen_random_warning(parts: Iterable[str]) -> str:
    parts = list(parts)
    fixes = "; ".join(f"{p}: {_PART_FIX[p]}" for p in parts)
    return (f"frozen part(s) {', '.join(parts)} were never loaded from any weights: they stay "
            f"RANDOM for the whole run. Load them with {fixes}")
