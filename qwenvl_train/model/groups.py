"""The one registry of QwenVL's module names: groups, parts, and where each consumer looks.

Every piece of code that needs a module or parameter name of `QwenVL` reads it here, so a
renamed or new module cannot silently escape a freeze list, a tensor-parallel split, the
pipeline placement or a checkpoint conversion:

  freezing, optimizer groups, weight decay   group_of, set_trainable, skips_weight_decay
  ViT layer-wise LR decay                    vit_layer_id, layer_decay_scale
  FLOP accounting (observe/flops.py)         PARTS, VISION_PARTS, part_group
  pipeline placement and parameter names     pipeline_slots (parallel/pipeline.py, partition.py)
  tensor-parallel column/row linears         tensor_parallel_plan (parallel/tensor_parallel.py)
  checkpoint conversion, our side            the names below, `local` (model/weights.py)
  LoRA targets, LoRA parameter names         lora_targets, LORA_A/LORA_B, is_lora

Naming contract of `QwenVL` (qwenvl.py, vision.py, adapter.py; the LLM is transformers'):
  vit.{conv1, positional_embedding, ln_pre}                 -> vit (layer-decay depth 0)
  vit.blocks.{i}.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}  -> vit
  adapter.{query, pos_embed, kv_proj, ln_q, ln_kv, attn}     -> adapter (the cross-attention)
  adapter.{ln_post, proj}                                    -> `post_group`
  llm.model.{embed_tokens, layers.{i}, norm, rotary_emb}, llm.lm_head   -> llm

`post_group` decides where the output LayerNorm and projection after the cross-attention
live. Default `vit`: the paper counts only the cross-attention as the 0.08B adapter, and the
released fine-tuning code froze `ln_post`/`proj` together with the ViT in stage 3.

Names only, no torch import: config validation imports `GROUPS` from here cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from qwenvl_train.model.config import QwenVLConfig

GROUPS: tuple[str, ...] = ("vit", "adapter", "llm")
VIT, ADAPTER, LLM = GROUPS  # also the QwenVL attributes holding each group's modules

# ---- the ViT (vision.py) ------------------------------------------------------------------
VIT_PATCH_EMBED = "vit.conv1"
VIT_POSITIONS = "vit.positional_embedding"
VIT_LN_PRE = "vit.ln_pre"
VIT_EMBED = (VIT_PATCH_EMBED, VIT_POSITIONS, VIT_LN_PRE)  # everything before the blocks
VIT_BLOCKS = "vit.blocks"  # vit.blocks.{i}


@dataclass(frozen=True)
class ViTBlockNames:
    """Submodules of one ViT block, relative to `vit.blocks.{i}` (OpenCLIP's names)."""

    attn: str = "attn"  # self-attention; its `heads` is the (local) head count
    qkv: str = "attn.in_proj"  # rows grouped per head [q_h | k_h | v_h]
    out: str = "attn.out_proj"
    fc: str = "mlp.c_fc"
    proj: str = "mlp.c_proj"


VIT_BLOCK = ViTBlockNames()

# ---- the adapter (adapter.py) -------------------------------------------------------------
ADAPTER_QUERY = "adapter.query"
ADAPTER_POS = "adapter.pos_embed"  # fixed sin-cos table (a buffer)
ADAPTER_KV_PROJ = "adapter.kv_proj"
ADAPTER_OUT_PROJ = "adapter.attn.out_proj"
ADAPTER_LINEARS = (ADAPTER_KV_PROJ, ADAPTER_OUT_PROJ)  # the cross-attention's nn.Linear modules
ADAPTER_LN_POST = "adapter.ln_post"
ADAPTER_PROJ = "adapter.proj"  # a bare (in, out) matrix
ADAPTER_POST = (ADAPTER_LN_POST, ADAPTER_PROJ)  # group: `post_group`

# ---- the LLM (a transformers Qwen2ForCausalLM) --------------------------------------------
LLM_BASE = "llm.model"  # the decoder stack (Qwen2Model)
LLM_EMBED = f"{LLM_BASE}.embed_tokens"
LLM_LAYERS = f"{LLM_BASE}.layers"  # llm.model.layers.{i}
LLM_ROTARY = f"{LLM_BASE}.rotary_emb"  # buffers only
LLM_NORM = f"{LLM_BASE}.norm"
LLM_HEAD = "llm.lm_head"


@dataclass(frozen=True)
class DecoderLayerNames:
    """Submodules of one decoder layer, relative to `llm.model.layers.{i}`."""

    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"  # SwiGLU: down(silu(gate(x)) * up(x))
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"


LLM_LAYER = DecoderLayerNames()

# ---- tensor parallelism: Megatron column- (output rows split) and row-parallel linears ----
COLUMN, ROW = "column", "row"
VIT_BLOCK_TP: dict[str, str] = {VIT_BLOCK.qkv: COLUMN, VIT_BLOCK.out: ROW,
                                VIT_BLOCK.fc: COLUMN, VIT_BLOCK.proj: ROW}
LLM_LAYER_TP: dict[str, str] = {
    LLM_LAYER.q: COLUMN, LLM_LAYER.k: COLUMN, LLM_LAYER.v: COLUMN, LLM_LAYER.o: ROW,
    LLM_LAYER.gate: COLUMN, LLM_LAYER.up: COLUMN, LLM_LAYER.down: ROW,
}

# ---- parts: the model as a chain in data-flow order (FLOP accounting) ---------------------
VISION_PARTS: tuple[str, ...] = ("vit", "adapter", "adapter_post")
PARTS: tuple[str, ...] = (*VISION_PARTS, "llm")
POST_PART = "adapter_post"

_VIT_BLOCK_RE = re.compile(rf"^{re.escape(VIT_BLOCKS)}\.(\d+)\.")
# Parameters that are positions or learned queries: never weight-decayed.
_NO_DECAY = (VIT_POSITIONS, ADAPTER_POS, ADAPTER_QUERY)


def vit_block(i: int) -> str:
    return f"{VIT_BLOCKS}.{i}"


def llm_layer(i: int) -> str:
    return f"{LLM_LAYERS}.{i}"


def local(path: str) -> str:
    """A name inside its group's module: `llm.model.norm` -> `model.norm` (what
    `model.llm.state_dict()` and a transformers checkpoint call it)."""
    group, _, rest = path.partition(".")
    if group not in GROUPS or not rest:
        raise ValueError(f"{path!r} is not a name inside one of {GROUPS}")
    return rest


def _under(name: str, path: str) -> bool:
    """`name` is the module/parameter `path` or inside it."""
    return name == path or name.startswith(path + ".")


def _strip_wrappers(name: str) -> str:
    """Remove wrapper prefixes (DeepSpeed `module.`, torch.compile `_orig_mod.`)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


# ---- groups and parts of a parameter name -------------------------------------------------
def part_of(name: str) -> str:
    """Part (of `PARTS`) of a parameter/buffer name; raises for a name outside the registry."""
    name = _strip_wrappers(name)
    if any(_under(name, p) for p in ADAPTER_POST):
        return POST_PART
    for group in GROUPS:
        if _under(name, group):
            return group
    raise KeyError(f"parameter {name!r} belongs to no module group {GROUPS}")


def part_group(part: str, post_group: str = "vit") -> str:
    """Module group of a part: the post part follows `post_group`, the others are groups."""
    if part == POST_PART:
        return post_group
    if part not in GROUPS:
        raise KeyError(f"unknown part {part!r}; parts are {PARTS}")
    return part


def group_of(name: str, post_group: str = "vit") -> str:
    """Group of a parameter name; raises for a name outside the registry."""
    return part_group(part_of(name), post_group)


def vit_layer_id(name: str, num_vit_layers: int) -> int:
    """Depth of a ViT-group parameter for layer-wise LR decay.

    0 = patch embedding, positions and ln_pre; i+1 = block i; num_layers+1 = anything after
    the blocks (ln_post/proj when they are in the vit group)."""
    name = _strip_wrappers(name)
    m = _VIT_BLOCK_RE.match(name)
    if m:
        return int(m.group(1)) + 1
    if any(_under(name, p) for p in VIT_EMBED):
        return 0
    return num_vit_layers + 1


def layer_decay_scale(name: str, num_vit_layers: int, decay: float) -> float:
    """LR multiplier decay**(depth_max - depth): the last block trains at the full rate."""
    return decay ** (num_vit_layers + 1 - vit_layer_id(name, num_vit_layers))


def skips_weight_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases, position tables and learned queries get no weight decay.
    A ZeRO-3 parameter is an empty 1-d placeholder outside a forward: its shape is ds_shape."""
    name = _strip_wrappers(name)
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim < 2 or any(_under(name, p) for p in _NO_DECAY)


# ---- pipeline placement -------------------------------------------------------------------
@dataclass(frozen=True)
class PipeSlot:
    """One layer of the pipeline chain: its name in split plans and the modules it holds
    (role -> module path; the pipeline layer keeps each module under its role)."""

    name: str
    modules: Mapping[str, str]


def pipeline_slots(num_llm_layers: int) -> list[PipeSlot]:
    """The chain a pipeline splits: ViT + adapter + token embedding (always on the first
    stage), one slot per decoder layer, then final norm + LM head. Every parameter of the
    model lies in exactly one slot."""
    first = PipeSlot("vision+embed", {"vit": VIT, "adapter": ADAPTER, "embed_tokens": LLM_EMBED})
    decoders = [PipeSlot(f"decoder.{i}", {"layer": llm_layer(i), "rotary": LLM_ROTARY})
                for i in range(num_llm_layers)]
    last = PipeSlot("norm+head", {"norm": LLM_NORM, "lm_head": LLM_HEAD})
    return [first, *decoders, last]


# ---- tensor parallelism and LoRA ----------------------------------------------------------
def tensor_parallel_plan(model_cfg: QwenVLConfig) -> dict[str, str]:
    """Module path -> COLUMN / ROW for every linear that tensor parallelism splits: the
    attention and MLP of each ViT block and each LLM decoder layer."""
    plan = {f"{vit_block(i)}.{rel}": style
            for i in range(model_cfg.vision.layers) for rel, style in VIT_BLOCK_TP.items()}
    plan.update({f"{llm_layer(i)}.{rel}": style
                 for i in range(model_cfg.llm.num_layers) for rel, style in LLM_LAYER_TP.items()})
    return plan


LORA_DEFAULT_PARTS: tuple[str, ...] = ("llm",)
# The rank-r matrices a LoRA layer adds beside its linear's `weight`/`bias` (model/lora.py):
# `{target}.lora_A` [rank, in] and `{target}.lora_B` [out, rank]. They belong to the group
# of the linear they adapt (LR scale, layer decay, logging).
LORA_A, LORA_B = "lora_A", "lora_B"


def is_lora(name: str) -> bool:
    """A LoRA matrix (of any target), by parameter name."""
    return name.rpartition(".")[2] in (LORA_A, LORA_B)


def lora_targets(model_cfg: QwenVLConfig,
                 parts: Iterable[str] = LORA_DEFAULT_PARTS) -> list[str]:
    """Module paths of the nn.Linear layers LoRA adapts for the chosen groups: `llm` the
    attention and MLP linears of every decoder layer (the default), `adapter` the
    cross-attention's kv_proj and out_proj, `vit` the attention and MLP linears of every
    block. (The fused adapter in_proj and `proj` are bare matrices, not linears.)"""
    parts = list(parts)
    unknown = sorted(set(parts) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown LoRA part(s) {unknown}; allowed: {list(GROUPS)}")
    out: list[str] = []
    if VIT in parts:
        out += [f"{vit_block(i)}.{rel}" for i in range(model_cfg.vision.layers)
                for rel in VIT_BLOCK_TP]
    if ADAPTER in parts:
        out += list(ADAPTER_LINEARS)
    if LLM in parts:
        out += [f"{llm_layer(i)}.{rel}" for i in range(model_cfg.llm.num_layers)
                for rel in LLM_LAYER_TP]
    return out


# ---- freezing and counts ------------------------------------------------------------------
@dataclass
class GroupCount:
    total: int
    trainable: int


def set_trainable(model: nn.Module, trainable: Iterable[str], post_group: str = "vit",
                  lora_parts: Iterable[str] = ()) -> None:
    """requires_grad=True exactly for the parameters of the named groups; in a group of
    `lora_parts` (LoRA on; model/lora_config.py) only for its LoRA matrices."""
    trainable, lora_parts = set(trainable), set(lora_parts)
    unknown = (trainable | lora_parts) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown module group(s) {sorted(unknown)}; allowed: {GROUPS}")
    for name, param in model.named_parameters():
        group = group_of(name, post_group)
        param.requires_grad_(group in trainable and (group not in lora_parts or is_lora(name)))


def _numel(param: Any) -> int:
    # ZeRO-3 partitioned parameters keep their full size in `ds_numel`.
    return int(getattr(param, "ds_numel", param.numel()))


def count_by_group(model: nn.Module, post_group: str = "vit") -> dict[str, GroupCount]:
    counts = {g: GroupCount(0, 0) for g in GROUPS}
    for name, param in model.named_parameters():
        c = counts[group_of(name, post_group)]
        c.total += _numel(param)
        if param.requires_grad:
            c.trainable += _numel(param)
    return counts


def check_trainable_groups(
    model: nn.Module, trainable: Iterable[str], post_group: str = "vit"
) -> dict[str, GroupCount]:
    """Refuse a stage whose trainable group has no trainable parameter."""
    counts = count_by_group(model, post_group)
    empty = [g for g in trainable if counts[g].trainable == 0]
    if empty:
        raise ValueError(
            f"stage marks group(s) {empty} trainable but they have no trainable parameters; "
            f"counts: { {g: (c.total, c.trainable) for g, c in counts.items()} }"
        )
    return counts
