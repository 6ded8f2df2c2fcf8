"""Weight import from the real released layouts, and the consolidated export.

Import (each copies into an already built `QwenVL`, checking every name and shape):
  OpenCLIP ViT-bigG/14 (`visual.*`)            -> vit          (stage-1 init)
  HF Qwen2/Qwen2.5 dir, or Qwen v1 checkpoint   -> llm          (stage-1 init)
  released Qwen-VL / Qwen-VL-Chat checkpoint    -> vit, adapter, llm
Every tensor of a source is accounted for: loaded, a known buffer (skipped with a log line),
or an error naming the key and its file.
Export: `model.safetensors` (our names) + `config.json` (QwenVLConfig) + `llm/` as a
transformers directory (hf_export.py); the released layout is released.py, the inverse of
the importers here; model/export.py writes the formats a run asks for.
Our side of every mapping is the registry's names (`groups.py`, as seen inside each group's
module: `groups.local`); the source layouts' names are written here. ViT block internals
(ln_1, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj) are named alike in OpenCLIP, the released
model and ours, and copy unchanged.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qwenvl_train.model import groups as G
from qwenvl_train.model.config import QwenVLConfig, WeightsConfig
from qwenvl_train.model.source_config import weight_files

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]
# Names inside `model.llm` (a transformers causal LM) of the vocabulary-sized tensors.
_LLM_EMBED_W = f"{G.local(G.LLM_EMBED)}.weight"
_LLM_HEAD_W = f"{G.local(G.LLM_HEAD)}.weight"

# ---- the source layouts' names ----------------------------------------------------------
# Every tensor of a Qwen v1 LLM (`transformer.*` + `lm_head`) and of the released vision
# tower (`transformer.visual.*`). Anything else in such a checkpoint is a known buffer
# (skipped) or an error naming key and file: never silently dropped.
V1_LLM_KEY = re.compile(
    r"^(lm_head\.weight|transformer\.(wte\.weight|ln_f\.weight|h\.\d+\.(ln_1\.weight"
    r"|ln_2\.weight|attn\.c_attn\.(weight|bias)|attn\.c_proj\.weight|mlp\.(w1|w2|c_proj)\.weight)))$")
RELEASED_VISUAL_KEY = re.compile(
    r"^transformer\.visual\.(conv1\.weight|positional_embedding|proj|(ln_pre|ln_post)\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.(weight|bias)|attn_pool\.(query|pos_embed|kv_proj\.weight|attn\.in_proj_(weight|bias)"
    r"|(ln_q|ln_kv|attn\.out_proj)\.(weight|bias)))$")
# Buffers older Qwen / Qwen2 code saved with the weights (rotary tables, attention masks):
# recomputed by every implementation, so skipped by name (with a log line).
KNOWN_BUFFER = re.compile(
    r"^(transformer\.(h\.\d+\.attn\.)?rotary_emb\.inv_freq|transformer\.h\.\d+\.attn\.(masked_bias|bias)"
    r"|model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq)$")
# Qwen v1 decoder-layer modules -> ours. v1's MLP is c_proj(w1(x) * silu(w2(x))): w2 is the
# gated branch (gate_proj), w1 the linear one. (c_attn, fused [Q | K | V], is split apart.)
V1_LAYER_MODULES = {"ln_1": G.LLM_LAYER.attn_norm, "ln_2": G.LLM_LAYER.mlp_norm,
                    "attn.c_proj": G.LLM_LAYER.o, "mlp.w1": G.LLM_LAYER.up,
                    "mlp.w2": G.LLM_LAYER.gate, "mlp.c_proj": G.LLM_LAYER.down}
V1_QKV = "attn.c_attn"


# ---- reading checkpoints ----------------------------------------------------------------
def _read_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def read_checkpoint(path: str | Path) -> tuple[StateDict, dict[str, Path]]:
    """A checkpoint file, or a directory with one file or a sharded index (.bin or
    .safetensors): its tensors, and the file each came from (for error messages)."""
    sd: StateDict = {}
    origin: dict[str, Path] = {}
    for file in weight_files(path):
        part = _read_file(file)
        sd.update(part)
        origin.update(dict.fromkeys(part, file))
    return sd, origin


def read_state_dict(path: str | Path) -> StateDict:
    return read_checkpoint(path)[0]


def drop_known_buffers(sd: Mapping[str, torch.Tensor], path: str | Path) -> StateDict:
    """`sd` without the known buffers (`KNOWN_BUFFER`), saying what was skipped."""
    skipped = [k for k in sd if KNOWN_BUFFER.match(k)]
    if skipped:
        kinds = Counter(re.sub(r"\.\d+\.", ".N.", k) for k in skipped)
        log.info("%s: skipping %d buffer(s) that hold no weights: %s", path, len(skipped),
                 ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    return {k: v for k, v in sd.items() if k not in set(skipped)}


def reject_unknown(unknown: Iterable[str], origin: Mapping[str, Path], what: str) -> None:
    """Refuse tensors an importer does not know, naming each key and its file."""
    unknown = sorted(unknown)
    if unknown:
        listed = "; ".join(f"{k} (in {origin.get(k, '?')})" for k in unknown[:8])
        more = f"; and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ValueError(
            f"{what}: {len(unknown)} tensor(s) that are neither weights of this layout nor "
            f"known buffers (rotary inv_freq, attention masked_bias/bias): {listed}{more}. "
            "Loading would drop them silently; remove them or convert the checkpoint.")


# ---- layout conversion (pure functions on state dicts) ----------------------------------
def qkv_to_per_head(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [Q; K; V] (nn.MultiheadAttention) -> per head [q_h | k_h | v_h] (released ViT)."""
    return rearrange(w, "(three h d) ... -> (h three d) ...", three=3, h=heads)


def convert_openclip_vit(sd: Mapping[str, torch.Tensor], heads: int) -> StateDict:
    """OpenCLIP `visual.*` -> our ViT names (relative to `vit.`). The class token, its
    position row and the CLIP head (ln_post/proj) are dropped: Qwen-VL has no CLS."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DDP-saved checkpoints
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    src = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {f"{G.local(G.VIT_PATCH_EMBED)}.weight": src["conv1.weight"],
           G.local(G.VIT_POSITIONS): src["positional_embedding"][1:]}  # row 0 = CLS position
    for key, value in src.items():
        if not key.startswith("transformer.resblocks."):
            if key.startswith("ln_pre."):
                out[G.local(G.VIT_LN_PRE) + key[len("ln_pre"):]] = value
            continue
        name = key.replace("transformer.resblocks.", G.local(G.VIT_BLOCKS) + ".")
        if ".attn.in_proj_" in name:  # nn.MultiheadAttention's fused [Q; K; V] weight/bias
            block, _, param = name.partition(".attn.in_proj_")
            name = f"{block}.{G.VIT_BLOCK.qkv}.{param}"
            value = qkv_to_per_head(value, heads)
        out[name] = value
    return out


def convert_qwen_v1_llm(sd: Mapping[str, torch.Tensor], prefix: str = "transformer.") -> StateDict:
    """Qwen (v1) decoder -> Qwen2 names (relative to `llm.`), by `V1_LAYER_MODULES`."""
    out: StateDict = {}
    for key, value in sd.items():
        if not key.startswith(prefix) or key.startswith(prefix + "visual."):
            continue
        key = key[len(prefix):]
        if key == "wte.weight":
            out[_LLM_EMBED_W] = value
        elif key.startswith("ln_f."):
            out[f"{G.local(G.LLM_NORM)}.{key[len('ln_f.'):]}"] = value
        elif key.startswith("h."):
            _, layer, rest = key.split(".", 2)
            base = f"{G.local(G.llm_layer(int(layer)))}."
            module, param = rest.rsplit(".", 1)
            if module == V1_QKV:  # fused [Q | K | V] rows, with bias
                qkv = (G.LLM_LAYER.q, G.LLM_LAYER.k, G.LLM_LAYER.v)
                for name, part in zip(qkv, value.chunk(3), strict=True):
                    out[f"{base}{name}.{param}"] = part
            else:
                out[f"{base}{V1_LAYER_MODULES[module]}.{param}"] = value
    if "lm_head.weight" in sd:
        out[_LLM_HEAD_W] = sd["lm_head.weight"]
    return out


def convert_released_visual(sd: Mapping[str, torch.Tensor], prefix: str = "transformer.visual."
                            ) -> tuple[StateDict, StateDict]:
    """Released `transformer.visual.*` -> (vit, adapter) state dicts in our names. The ViT
    in_proj is already per-head grouped, so everything copies 1:1."""
    post = {"ln_post": G.local(G.ADAPTER_LN_POST), "proj": G.local(G.ADAPTER_PROJ)}
    vit: StateDict = {}
    adapter: StateDict = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        module, dot, rest = key.partition(".")
        if module == "attn_pool":  # the resampler: the adapter's names are the released ones
            adapter[rest] = value
        elif module in post:
            adapter[post[module] + dot + rest] = value
        else:
            vit[key.replace("transformer.resblocks.", G.local(G.VIT_BLOCKS) + ".")] = value
    return vit, adapter


# ---- copying into a built model ---------------------------------------------------------
def fit_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Resize a [V, D] embedding/head to `rows`; new rows (e.g. the Qwen-VL special tokens
    missing from a plain Qwen2 vocab) start at the mean of the existing rows."""
    if weight.shape[0] == rows:
        return weight
    if weight.shape[0] > rows:
        log.warning("truncating vocab rows %d -> %d", weight.shape[0], rows)
        return weight[:rows]
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    log.info("extending vocab rows %d -> %d (new rows = mean row)", weight.shape[0], rows)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


@torch.no_grad()
def _copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    if hasattr(dst, "ds_id"):  # a ZeRO-3 partitioned parameter: gather, write on rank 0
        import deepspeed
        import torch.distributed as dist

        with deepspeed.zero.GatheredParameters([dst], modifier_rank=0):
            if dist.get_rank() == 0:
                dst.data.copy_(src)
        return
    if dst.is_meta:
        raise ValueError("cannot load weights into a meta-device model; materialize it first")
    dst.copy_(src)


def tensors_of(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The module's persistent tensors by state-dict name (parameters stay parameters)."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in skip}


class WeightsMismatch(ValueError):
    """A checkpoint whose names or shapes do not fit the built model."""


def load_into(targets: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str,
              vocab_keys: tuple[str, ...] = ()) -> None:
    """Copy `sd` into `targets` by name; names must match exactly, shapes too (vocab rows of
    `vocab_keys` are fitted first)."""
    missing = sorted(set(targets) - set(sd))
    unexpected = sorted(set(sd) - set(targets))
    if missing or unexpected:
        raise WeightsMismatch(f"{what}: checkpoint does not match the model; missing "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, dst in targets.items():
        src = sd[name]
        shape = tuple(getattr(dst, "ds_shape", dst.shape))
        if name in vocab_keys:
            src = fit_vocab(src, shape[0])
        if tuple(src.shape) != shape:
            raise WeightsMismatch(f"{what}: {name} has shape {tuple(src.shape)} in the checkpoint, "
                             f"{shape} in the model")
        _copy_(dst, src)


_VOCAB_KEYS = (_LLM_EMBED_W, _LLM_HEAD_W)


def _llm_state(sd: Mapping[str, torch.Tensor], llm: nn.Module) -> StateDict:
    if any(k.startswith("transformer.h.") for k in sd):
        out = convert_qwen_v1_llm(sd)
    else:  # a transformers directory: our LLM's own names
        ours = (G.local(G.LLM_BASE) + ".", G.local(G.LLM_HEAD) + ".")
        out = {k: v for k, v in sd.items() if k.startswith(ours)}
    if _LLM_HEAD_W not in out:  # a tied checkpoint (small Qwen2) into an untied model
        out[_LLM_HEAD_W] = out[_LLM_EMBED_W]
    if getattr(llm.config, "tie_word_embeddings", False):
        out.pop(_LLM_HEAD_W)  # shared with the embedding; loaded once
    return out


def _llm_targets(llm: nn.Module) -> dict[str, torch.Tensor]:
    tied = getattr(llm.config, "tie_word_embeddings", False)
    return tensors_of(llm, skip=(_LLM_HEAD_W,) if tied else ())


def load_vit_openclip(model: nn.Module, path: str | Path) -> None:
    sd = convert_openclip_vit(read_state_dict(path), model.vit.cfg.heads)
    load_into(tensors_of(model.vit), sd, f"OpenCLIP ViT {path}")


def _is_v1(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("transformer.h.") for k in sd)


def load_llm(model: nn.Module, path: str | Path) -> None:
    """HF Qwen2/Qwen2.5 directory (model.*, lm_head) or a Qwen v1 checkpoint (transformer.*)."""
    sd, origin = read_checkpoint(path)
    sd = drop_known_buffers(sd, path)
    if _is_v1(sd):
        visual = [k for k in sd if RELEASED_VISUAL_KEY.match(k)]
        if visual:
            log.info("%s: ignoring its %d transformer.visual.* tensors (model.weights.qwenvl "
                     "loads a whole Qwen-VL)", path, len(visual))
        unknown = [k for k in sd if not (V1_LLM_KEY.match(k) or RELEASED_VISUAL_KEY.match(k))]
    else:
        unknown = set(sd) - set(tensors_of(model.llm))
    reject_unknown(unknown, origin, f"LLM {path}")
    sd = _llm_state(sd, model.llm)
    load_into(_llm_targets(model.llm), sd, f"LLM {path}", vocab_keys=_VOCAB_KEYS)


def load_qwenvl(model: nn.Module, path: str | Path) -> None:
    """Released Qwen-VL / Qwen-VL-Chat (`transformer.visual.*` + Qwen v1 LLM) -> whole model."""
    sd, origin = read_checkpoint(path)
    sd = drop_known_buffers(sd, path)
    reject_unknown([k for k in sd if not (V1_LLM_KEY.match(k) or RELEASED_VISUAL_KEY.match(k))],
                   origin, f"Qwen-VL {path}")
    vit, adapter = convert_released_visual(sd)
    dim, width = model.config.adapter.embed_dim, model.config.vision.width
    kv_proj = f"{G.local(G.ADAPTER_KV_PROJ)}.weight"
    if kv_proj not in adapter and dim == width:  # released: Identity when width == D
        adapter[kv_proj] = torch.eye(dim)
    load_into(tensors_of(model.vit), vit, f"Qwen-VL visual {path}")
    load_into(tensors_of(model.adapter), adapter, f"Qwen-VL resampler {path}")
    load_into(_llm_targets(model.llm), _llm_state(sd, model.llm), f"Qwen-VL LLM {path}",
              vocab_keys=_VOCAB_KEYS)


_SIZE_HINT = ("\nThe checkpoint's sizes differ from the model's: model.sizes=from_weights (or "
              "model=from_weights) takes them from its config; the released Qwen-VL is "
              "model=qwenvl_7b.")


def load_init_weights(model: nn.Module, weights: WeightsConfig) -> list[str]:
    """Apply `model.weights.*`: the whole released model first, then per-part overrides."""
    done = []
    steps = ((weights.qwenvl, "qwenvl", load_qwenvl), (weights.vit, "vit", load_vit_openclip),
             (weights.llm, "llm", load_llm))
    for path, name, load in steps:
        if not path:
            continue
        try:
            load(model, path)
        except WeightsMismatch as e:
            raise WeightsMismatch(f"{e}{_SIZE_HINT}") from None
        done.append(f"{name} <- {path}")
    for line in done:
        log.info("loaded %s", line)
    return done


# ---- consolidated export ----------------------------------------------------------------
def cpu_tensors(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one (tied
    weights) becomes its own copy, since safetensors refuses shared storage."""
    seen: set[int] = set()
    out: StateDict = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def write_consolidated(tensors: Mapping[str, torch.Tensor], config: QwenVLConfig,
                       out_dir: str | Path) -> Path:
    """`model.safetensors` (our names) + `config.json` (QwenVLConfig): what init_from reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return out


def export_consolidated(model: nn.Module, config: QwenVLConfig, out_dir: str | Path,
                        state_dict: Mapping[str, torch.Tensor] | None = None,
                        chat: bool = False) -> Path:
    """Write `model.safetensors`, `config.json` and `llm/` (a complete transformers
    directory, model/hf_export.py). Pass `state_dict` when the model's own tensors are
    partitioned (ZeRO-3); `chat` makes `<|im_end|>` the LLM's stop token."""
    from qwenvl_train.model.hf_export import save_hf_llm

    tensors = cpu_tensors(state_dict if state_dict is not None else model.state_dict())
    out = write_consolidated(tensors, config, out_dir)
    save_hf_llm(model.llm, tensors, out / "llm", chat=chat)
    return out


def load_consolidated(model: nn.Module, path: str | Path) -> None:
    """Load an export (directory or its model.safetensors) strictly into a built model; the
    image size the model was built for does not matter (the position tables are fixed)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    cfg_file = file.parent / "config.json"
    own = getattr(model, "config", None)
    if cfg_file.is_file() and isinstance(own, QwenVLConfig):
        saved = QwenVLConfig.from_dict(json.loads(cfg_file.read_text()))
        saved.adapter.post_group = own.adapter.post_group  # a stage's choice, not a size
        for part in ("vision", "adapter", "llm"):
            if getattr(saved, part) != getattr(own, part):
                raise ValueError(f"{file}: model.{part} differs from the export's: "
                                 f"{getattr(own, part)} vs {getattr(saved, part)}")
    load_into(tensors_of(model), LazySafetensors(file), f"consolidated {file}")


class LazySafetensors(Mapping):
    """A safetensors file as a mapping that reads a tensor only when asked (memory-mapped):
    ranks on one node share the page cache, and no rank holds more than one tensor extra,
    instead of every rank materialising the whole 19 GB export."""

    def __init__(self, path: str | Path):
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
