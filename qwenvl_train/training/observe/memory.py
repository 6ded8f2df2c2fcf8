"""Memory per GPU of a training step: the model behind `qwenvl-plan` (observe/plan.py).

Model states, per GPU of a layout pp x tp x dp with ZeRO stage z (P: parameters on this
GPU after tensor and pipeline splitting, T: the trainable ones among them):
                   fp32                     bf16 / fp16 (DeepSpeed mixed precision)
  parameters       4 P  (/dp at z = 3)      2 P  (/dp at z = 3), frozen ones included
  gradients        4 T  (/dp at z >= 2)     g T  (/dp at z >= 2), g = 2 (accumulated in
                                            bf16) or 4 (`parallel.grad_accum_dtype=fp32`)
  optimizer        8 T  (Adam m, v;         12 T (fp32 master copy + Adam m, v;
                   /dp at z >= 1)           /dp at z >= 1)
  buffers          DeepSpeed's gradient buckets: z = 1, 2: (2 with overlap_comm, else 1)
                   x reduce_bucket_size elements of the gradient dtype (allocated whole,
                   whatever the model size); z = 3: one reduce bucket + the gathered
                   parameters of the largest module and the prefetch bucket.

Activations of one micro-batch: the tensors autograd saves, written out per layer from the
code that runs (vision.py, adapter.py, transformers' Qwen2 decoder layer, the loss in
qwenvl.py) and checked against MemTracker on the CPU (tests/test_plan.py). A part saves by
how it takes part in backward (`flops.part_multipliers`): trained parts everything,
frozen parts behind a trained one only what input gradients need (no linear inputs),
frozen parts in front of everything trained nothing. Per token, in elements of the compute
dtype (b bytes; u = 4 / b: RMSNorm keeps an fp32 copy of its input under bf16):
  ViT block        trained 8w + 2m; frozen 6w + m  (block input, q k v, attention output,
                   residual, GELU input; trained adds both LayerNorm outputs and the GELU
                   output); + LayerNorm statistics and the attention log-sum-exp (fp32)
  decoder layer    trained (2u + 4 + qkv) h + 4i; frozen 2u h + qkv h + 3i where qkv h =
                   (heads + 2 kv_heads) head_dim  (norm inputs, q k v, attention output,
                   SwiGLU gate/up/SiLU; trained adds norm outputs and the down_proj input)
                   + with the SDPA backend the boolean [B, 1, L, L] mask that SDPA turns
                   into a float mask of the compute dtype per layer (L b bytes per token);
                   flex and flash-attention build none
  checkpointed     the layer's input only (w or h); one layer's activations are rebuilt at
                   a time in backward (counted in the transient)
  adapter (image)  n w + 5 n D + 4 Q D trained (kv_proj input, ln_kv in/out, key, q k v,
                   output, ln_post in/out)
  loss             plain: the fp32 log-softmax [label tokens, vocab] (and 12 bytes per
                   logit at the peak of its backward); chunked (`model.chunked_loss`): the
                   gradients of the head's input and weight, and one fp32 chunk (+ its
                   16-bit copy under bf16).
Tensor parallelism splits what lives in the split dimension (heads, MLP); norms and
residuals stay whole. A pipeline stage holds min(pp - stage, micro-batches) micro-batches
in flight (1F1B). The peak is at the start of a backward: model states + activations +
the largest transient (the loss's backward, or one rebuilt layer and its gradients), or at
the optimizer step (model states + the unfused AdamW's and the fp32 gradient copies).
CUDA context, NCCL buffers and allocator fragmentation are not modelled: plan.py keeps a
margin of the GPU's memory for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from qwenvl_train.model import groups
from qwenvl_train.model.attention import resolve_attn_implementation
from qwenvl_train.model.loss import chunk_tokens
from qwenvl_train.training.observe.flops import part_multipliers, vit_tokens

if TYPE_CHECKING:
    from qwenvl_train.config import TrainConfig
    from qwenvl_train.model.config import QwenVLConfig

TRAINED, FROZEN, NO_GRAD = 3, 2, 1  # how a part takes part in backward (flops multipliers)
FP32 = 4
MASKLESS = ("flex", "flash_attention_2")  # packed attention without an [L, L] mask
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements)
DEFAULT_PREFETCH = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default


# ---- what is planned ---------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One micro-batch: rows x seq_len tokens, `images` images, `label_tokens` positions
    with a label (where the LM head runs), packed samples of mean length `segment_len`."""

    rows: int
    seq_len: int
    images: int
    label_tokens: int
    segment_len: float

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


@dataclass(frozen=True)
class Options:
    """The switches that change memory, resolved for the target device."""

    param_bytes: int  # 4 fp32, 2 bf16/fp16
    grad_bytes: int
    attention: str  # resolved backend: flex | flash_attention_2 | sdpa | eager
    chunked_loss: bool
    checkpoint: dict[str, int]  # part (vit, llm) -> every k-th layer; 0 = off
    fused_adamw: bool = False
    foreach: bool = True  # torch's AdamW default on CUDA (multi-tensor); CPU: per tensor

    @property
    def mixed(self) -> bool:
        return self.param_bytes < FP32


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    tp: int = 1
    dp: int = 1
    zero: int = 0
    overlap_comm: bool = False
    reduce_bucket: int = DEFAULT_BUCKET
    prefetch_bucket: int = DEFAULT_PREFETCH


@dataclass
class Memory:
    """Bytes per GPU (the most loaded pipeline stage)."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    buffers: float = 0.0
    activations: float = 0.0  # everything saved for backward, all micro-batches in flight
    transient: float = 0.0  # the largest short-lived block on top, at the peak
    step_transient: float = 0.0  # on top of the model states during the optimizer step
    stage: int = 0  # the pipeline stage described

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def peak(self) -> float:
        return self.states + max(self.activations + self.transient, self.step_transient)


# ---- options from a config ---------------------------------------------------------------
def options_from_config(cfg: TrainConfig, on_cuda: bool = True) -> Options:
    """Read the memory-relevant keys, resolved as the model resolves them for `on_cuda`
    (model/attention.py, model/config.py)."""
    precision = cfg.stage.precision
    param_bytes = FP32 if precision == "fp32" else 2
    grad_bytes = (FP32 if precision == "fp32" or cfg.parallel.grad_accum_dtype == "fp32"
                  else param_bytes)
    gc = cfg.model.gradient_checkpointing
    every = {part: (getattr(gc, f"{part}_every") if getattr(gc, part) else 0)
             for part in ("vit", "llm")}
    return Options(
        param_bytes=param_bytes, grad_bytes=grad_bytes,
        attention=resolve_attn_implementation(cfg.model.attn_implementation, on_cuda),
        chunked_loss=cfg.model.uses_chunked_loss(on_cuda),
        checkpoint=every, fused_adamw=cfg.parallel.fused_adamw,
        foreach=on_cuda)


def layout_from_config(cfg: TrainConfig, world_size: int) -> Layout:
    from qwenvl_train.training.parallel.engine import zero_optimization
    from qwenvl_train.training.parallel.topology import validate_parallel

    sizes = validate_parallel(cfg.parallel, world_size)
    zero_cfg = zero_optimization(cfg)  # what DeepSpeed gets
    return Layout(pp=sizes.pp, tp=sizes.tp, dp=sizes.dp, zero=cfg.parallel.zero_stage,
                  overlap_comm=bool(zero_cfg.get("overlap_comm", False)),
                  reduce_bucket=int(zero_cfg.get("reduce_bucket_size", DEFAULT_BUCKET)),
                  prefetch_bucket=int(zero_cfg.get("stage3_prefetch_bucket_size",
                                                   DEFAULT_PREFETCH)))


# ---- parameters: counted on a meta-device model, placed by the registry ------------------
@dataclass(frozen=True)
class ParamCounts:
    """Per pipeline slot (groups.pipeline_slots): parameters per group, whole and split
    by tensor parallelism; and the largest parameter tensor per group (the embedding or the
    LM head: what ZeRO-3 gathers at once, the largest gradient, the single-tensor AdamW's
    temporaries)."""

    whole: tuple[dict[str, int], ...]
    split: tuple[dict[str, int], ...]
    largest: dict[str, int]

    def largest_of(self, group_names) -> int:
        return max((self.largest[g] for g in group_names), default=0)


def _slot_of(name: str, slots: list[groups.PipeSlot]) -> int:
    for i, slot in enumerate(slots):
        if any(name == p or name.startswith(p + ".") for p in slot.modules.values()):
            return i
    raise KeyError(f"parameter {name!r} is in no pipeline slot")


@lru_cache(maxsize=8)
def _param_counts_cached(model_json: str) -> ParamCounts:
    import torch

    from qwenvl_train.model.config import QwenVLConfig
    from qwenvl_train.model.qwenvl import build_model

    model_cfg = QwenVLConfig.from_dict(json.loads(model_json))
    with torch.device("meta"):  # names and shapes only, no memory
        model = build_model(model_cfg, image_size=model_cfg.vision.patch_size)
    slots = groups.pipeline_slots(model_cfg.llm.num_layers)
    plan = groups.tensor_parallel_plan(model_cfg)
    whole = [dict.fromkeys(groups.GROUPS, 0) for _ in slots]
    split = [dict.fromkeys(groups.GROUPS, 0) for _ in slots]
    post = model_cfg.adapter.post_group
    largest = dict.fromkeys(groups.GROUPS, 0)
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        style = plan.get(module)
        # Column-parallel: weight and bias split; row-parallel: weight split, bias whole.
        is_split = style == groups.COLUMN or (style == groups.ROW and leaf == "weight")
        target = split if is_split else whole
        group = groups.group_of(name, post)
        target[_slot_of(name, slots)][group] += p.numel()
        largest[group] = max(largest[group], p.numel())
    return ParamCounts(tuple(whole), tuple(split), largest)


def param_counts(model_cfg: QwenVLConfig) -> ParamCounts:
    return _param_counts_cached(json.dumps(dataclasses.asdict(model_cfg), sort_keys=True))


# ---- activations per micro-batch ---------------------------------------------------------
def _modes(model_cfg: QwenVLConfig, trainable: list[str]) -> dict[str, int]:
    return part_multipliers(trainable, model_cfg.adapter.post_group)


def vit_block_bytes(model_cfg: QwenVLConfig, mode: int, b: int, tp: int) -> float:
    """Saved bytes per image token of one ViT block (not checkpointed)."""
    v = model_cfg.vision
    if mode == NO_GRAD:
        return 0.0
    w, m, heads = v.width, v.mlp_dim / tp, v.heads / tp
    elems = w + 3 * w / tp + w / tp + w + m  # input, q k v, attention out, residual, GELU in
    if mode == TRAINED:
        elems += w + w + m  # ln_1 and ln_2 outputs, GELU output (linear inputs)
    return elems * b + 4 * FP32 + heads * FP32  # LayerNorm mean/rstd x 2, log-sum-exp


def decoder_layer_bytes(model_cfg: QwenVLConfig, mode: int, b: int, tp: int,
                        attention: str, seq_len: int) -> float:
    """Saved bytes per token of one decoder layer (not checkpointed)."""
    llm = model_cfg.llm
    if mode == NO_GRAD:
        return 0.0
    h, d = llm.hidden_size, llm.hidden_size // llm.num_heads
    heads, kv, inter = llm.num_heads / tp, llm.num_kv_heads / tp, llm.intermediate_size / tp
    u = FP32 / b  # RMSNorm saves its input in fp32
    elems = 2 * u * h + (heads + 2 * kv) * d + heads * d + 3 * inter
    if mode == TRAINED:
        elems += 4 * h + inter  # both norms' normalised and weighted outputs, down_proj input
    out = elems * b + 2 * FP32 + heads * FP32  # rsqrt x 2, log-sum-exp
    if attention == "sdpa":
        out += seq_len * b  # the float copy SDPA makes of the boolean mask, per layer
    elif attention == "eager":
        out += heads * seq_len * (FP32 + b)  # softmax in fp32 and its cast (the scores)
    return out


def adapter_bytes(model_cfg: QwenVLConfig, modes: dict[str, int], b: int,
                  image_size: int) -> float:
    """Saved bytes per image of the cross-attention and ln_post / proj."""
    n = vit_tokens(model_cfg.vision, image_size)
    w, dim, q = model_cfg.vision.width, model_cfg.adapter.embed_dim, model_cfg.adapter.num_queries
    attn, post = modes[groups.ADAPTER], modes[groups.POST_PART]
    elems = 0.0
    if attn != NO_GRAD:
        elems += n * dim + q * dim + 2 * n * dim + q * dim  # ln_kv input, q k v, output
        if attn == TRAINED:
            elems += n * w + 2 * n * dim  # kv_proj input, ln_kv output (value), key
    if post != NO_GRAD:
        elems += q * dim  # ln_post input
        if post == TRAINED:
            elems += q * dim  # ln_post output (the proj matmul's input)
    return elems * b + n * 2 * FP32 + model_cfg.adapter.heads * q * FP32


def _checkpointed(layers: int, every: int) -> int:
    """How many of `layers` (0, k, 2k, ...) are checkpointed with every=k (0 = none)."""
    return 0 if every <= 0 else math.ceil(layers / every)


@dataclass
class StageActivations:
    saved: float  # bytes kept for backward by one micro-batch on this pipeline stage
    transient: float  # the most on top of `saved` at any moment of its backward


@dataclass
class Phase:
    """A part of the forward chain: what it saves, and what its backward needs on top."""

    saved: float
    transient: float = 0.0


def stage_activations(model_cfg: QwenVLConfig, trainable: list[str], image_size: int,
                      work: Workload, opt: Options, tp: int, slots: range,
                      num_slots: int) -> StageActivations:
    """Activations of one micro-batch on the pipeline stage holding `slots`.

    Backward runs the chain in reverse and frees what each part saved as it passes, so
    while part i is in its backward only the parts up to i still hold their activations:
    the transient is the largest (saved up to i + transient of i) over the whole saved."""
    modes = _modes(model_cfg, trainable)
    phases = [Phase(5 * 8 * work.tokens)]  # ids, labels, positions, segments, task ids
    if 0 in slots:
        phases.append(_vision_phase(model_cfg, modes, image_size, work, opt, tp))
    decoders = [s for s in slots if 0 < s < num_slots - 1]
    if decoders:
        if 0 not in slots:  # the hidden state received from the previous stage
            phases.append(Phase(model_cfg.llm.hidden_size * opt.param_bytes * work.tokens))
        phases.append(_decoder_phase(model_cfg, modes[groups.LLM], decoders, work, opt, tp))
    if num_slots - 1 in slots:  # final norm + head + loss
        phases.append(Phase(*loss_bytes(model_cfg, modes[groups.LLM], work, opt)))
    total, prefix, peak = sum(p.saved for p in phases), 0.0, 0.0
    for phase in phases:
        prefix += phase.saved
        peak = max(peak, prefix + phase.transient)
    return StageActivations(total, max(0.0, peak - total))


def _vision_phase(model_cfg: QwenVLConfig, modes: dict[str, int], image_size: int,
                  work: Workload, opt: Options, tp: int) -> Phase:
    """ViT + adapter + the images; a checkpointed block is rebuilt in its backward."""
    b, mode = opt.param_bytes, modes[groups.VIT]
    n = vit_tokens(model_cfg.vision, image_size) * work.images  # ViT tokens
    block = vit_block_bytes(model_cfg, mode, b, tp) * n
    layers = model_cfg.vision.layers
    ckpt = _checkpointed(layers, opt.checkpoint["vit"]) if mode != NO_GRAD else 0
    held = model_cfg.vision.width * b * n  # a checkpointed block keeps its input
    saved = (layers - ckpt) * block + ckpt * held
    saved += 3 * image_size**2 * work.images  # the uint8 batch
    if mode == TRAINED:
        saved += 3 * image_size**2 * work.images * b  # normalised images (conv input)
    if mode != NO_GRAD:
        saved += held  # ln_pre input
    saved += adapter_bytes(model_cfg, modes, b, image_size) * work.images
    temps = _backward_temps(model_cfg, "vit", b, tp) * n if mode != NO_GRAD else 0.0
    return Phase(saved, temps + (block if ckpt else 0.0))


def _decoder_phase(model_cfg: QwenVLConfig, mode: int, decoders: list[int], work: Workload,
                   opt: Options, tp: int) -> Phase:
    """The stage's decoder layers (slot s holds decoder s - 1), rotary tables and mask."""
    llm, b, tokens = model_cfg.llm, opt.param_bytes, work.tokens
    layer = decoder_layer_bytes(model_cfg, mode, b, tp, opt.attention, work.seq_len) * tokens
    every = opt.checkpoint["llm"]
    ckpt = 0 if mode == NO_GRAD else sum(1 for s in decoders
                                         if every and (s - 1) % every == 0)
    saved = (len(decoders) - ckpt) * layer + ckpt * llm.hidden_size * b * tokens
    saved += 2 * tokens * (llm.hidden_size // llm.num_heads) * b  # rotary cos / sin
    if opt.attention in ("sdpa", "eager"):  # the batch's [B, 1, L, L] mask
        saved += work.rows * work.seq_len**2 * (1 if opt.attention == "sdpa" else b)
    temps = _backward_temps(model_cfg, "llm", b, tp) * tokens if mode != NO_GRAD else 0.0
    return Phase(saved, temps + (layer if ckpt else 0.0))


def _backward_temps(model_cfg: QwenVLConfig, part: str, b: int, tp: int) -> float:
    """Activation gradients alive at once inside one layer's backward, per token: the
    MLP's (GELU / SwiGLU) intermediates and their gradients."""
    if part == "vit":
        return 3 * model_cfg.vision.mlp_dim / tp * b
    return 3 * model_cfg.llm.intermediate_size / tp * b


def loss_bytes(model_cfg: QwenVLConfig, mode: int, work: Workload,
               opt: Options) -> tuple[float, float]:
    """(saved, transient) of the final norm, LM head and cross-entropy."""
    llm, b = model_cfg.llm, opt.param_bytes
    h, vocab, labels = llm.hidden_size, llm.vocab_size, work.label_tokens
    trained = mode == TRAINED
    saved = (FP32 / b) * h * b * work.tokens  # final RMSNorm input in fp32
    if trained:
        saved += 2 * h * b * work.tokens + labels * h * b  # norm outputs, gathered hidden
    if opt.chunked_loss:
        saved += labels * h * b + (vocab * h * b if trained else 0)  # grads kept from forward
        chunk = chunk_tokens(vocab) * vocab  # one [chunk tokens, vocab] block (model/loss.py)
        # its fp32 logits (softmax built in place) + their copy in a 16-bit compute dtype
        transient = chunk * (FP32 + (b if b < FP32 else 0))
    else:
        saved += labels * vocab * FP32  # log-softmax output
        transient = labels * vocab * (2 * FP32)  # its gradient and the logits' gradient
    return saved, transient


# ---- the whole GPU -----------------------------------------------------------------------
def pipeline_parts(model_cfg: QwenVLConfig, trainable: list[str], image_size: int,
                   seq_len: int, pack: bool, pp: int) -> list[int]:
    """Slot boundaries of the pipeline stages, as training/parallel/partition.py splits."""
    if pp == 1:
        return [0, model_cfg.llm.num_layers + 2]
    from qwenvl_train.training.parallel.partition import plan_split

    return plan_split(model_cfg, pp, image_size, seq_len, trainable, pack=pack).parts


def memory_per_gpu(model_cfg: QwenVLConfig, trainable: list[str], image_size: int,
                   work: Workload, opt: Options, layout: Layout, accum: int,
                   pack: bool = False) -> Memory:
    """The most loaded GPU's memory (the max over pipeline stages of the peak)."""
    counts = param_counts(model_cfg)
    parts = pipeline_parts(model_cfg, trainable, image_size, work.seq_len, pack, layout.pp)
    best: Memory | None = None
    for stage in range(layout.pp):
        slots = range(parts[stage], parts[stage + 1])
        act = stage_activations(model_cfg, trainable, image_size, work, opt, layout.tp,
                                slots, len(counts.whole))
        in_flight = min(layout.pp - stage, accum)  # 1F1B; 1 without a pipeline
        mem = _stage_memory(set(trainable), opt, layout, counts, slots, act, in_flight)
        mem.stage = stage
        if best is None or mem.peak > best.peak:
            best = mem
    return best


def _stage_memory(trained: set[str], opt: Options, layout: Layout, counts: ParamCounts,
                  slots: range, act: StageActivations, in_flight: int) -> Memory:
    def total(only_trained: bool) -> float:
        return sum(counts.whole[s][g] + counts.split[s][g] / layout.tp
                   for s in slots for g in groups.GROUPS if g in trained or not only_trained)

    p_all, p_train = total(False), total(True)
    dp, z, pb, gb = layout.dp, layout.zero, opt.param_bytes, opt.grad_bytes
    mem = Memory()
    mem.params = p_all * pb / (dp if z == 3 else 1)
    mem.grads = p_train * gb / (dp if z >= 2 else 1)
    per_state = (4 + 8) if opt.mixed else 8  # fp32 master copy only in mixed precision
    mem.optimizer = p_train * per_state / (dp if z >= 1 else 1)
    if z in (1, 2) and p_train:
        mem.buffers = (2 if layout.overlap_comm else 1) * layout.reduce_bucket * gb
    elif z == 3:
        gathered = counts.largest_of(groups.GROUPS) + layout.prefetch_bucket
        mem.buffers = layout.reduce_bucket * gb + gathered * pb
    mem.activations = act.saved * in_flight
    # The largest gradient arriving in backward before it is added to the accumulated one.
    largest_grad = counts.largest_of(trained) * gb if p_train else 0.0
    mem.transient = max(act.transient, largest_grad)
    # The optimizer step: AdamW's temporaries (sqrt of the second moment and its scaled
    # copy) over all parameters at once (multi-tensor), or per tensor; none when fused.
    master = FP32 * (p_train / (dp if z >= 1 else 1))
    step = 0.0
    if not opt.fused_adamw:
        step = master if opt.foreach else 2 * FP32 * counts.largest_of(trained)
    if opt.mixed and gb < FP32:
        step += master  # the fp32 copy of the gradients for the master step
    mem.step_transient = step
    return mem
