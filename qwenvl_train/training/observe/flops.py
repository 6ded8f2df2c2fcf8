"""Matmul FLOPs of a Qwen-VL model and the project's MFU formula.

Counting rules (2 FLOPs per multiply-accumulate; only matmuls, i.e. no norms, softmax,
activations, RoPE, biases or embedding lookups -- together well under 1% of the total):

ViT, per image at side S, patch p, width w, MLP m, n = (S // p)**2 tokens (no CLS token):
    patch embed   2 * n * (3 p^2) * w
    per block     2 * n * w * 3w  (qkv)  +  2 * n^2 * w  (scores)  +  2 * n^2 * w  (attn @ V)
                + 2 * n * w * w   (out)  +  2 * n * w * m * 2  (MLP fc + proj)
Adapter, per image, Q queries, embed D, ViT width w:
    cross-attention  2 n w D (kv_proj) + 2 Q D^2 (q) + 2 n D^2 * 2 (k, v) + 2 Q n D * 2
                     (scores, attn @ V) + 2 Q D^2 (out proj)
    post             2 Q D^2 (ln_post @ proj; its group is `adapter.post_group`)
LLM, per token, hidden h, heads a, kv heads k, head dim d = h/a, MLP i, vocab V:
    per layer     2 h (a d + 2 k d) (qkv) + 2 * span * a d * 2 (scores, attn @ V)
                + 2 h h (o_proj) + 2 h i * 3 (SwiGLU gate, up, down)
    head          2 h V, only at positions whose logits are computed (loss positions)
    `span` is the mean number of keys a query attends to. Attention is causal, so a row of
    length L averages (L+1)/2 keys; we use L/2 (half a key per query less, negligible; the
    usual convention). Pads are computed, so they count as tokens. In packed rows a token
    sees only its own sample, so the span is half the token-weighted mean segment length
    sum(l^2)/sum(l) (`segment_len`, see `effective_segment_len`). Masked-out work is not
    counted: FLOPs a kernel spends on masked blocks are not useful work.

Training FLOPs of one step (the MFU formula), with the model as the registry's chain of
parts (`groups.PARTS`) vit -> adapter cross-attention -> adapter_post (ln_post/proj) -> llm:
    step = sum over parts of  c_part * forward_part
    c = 3  trained part: forward + backward to inputs + backward to weights (each ~ forward)
    c = 2  frozen part downstream of some trained part: activation gradients must flow
           through it to reach the trained part, but no weight gradients are computed
    c = 1  frozen part upstream of every trained part (e.g. the frozen ViT in stage 3)
    c = 2  trained part adapted by LoRA (`adapted`): its base weights get no gradient (the
           rank-r matrices' own FLOPs, a few percent of the linears', are not counted)
E.g. stage 3 with post_group=vit: ViT 1x, cross-attention 3x, ln_post/proj 2x, LLM 3x.
Activation recomputation (gradient checkpointing) is not counted: this is model FLOPs
utilization (MFU), not hardware FLOPs utilization. MFU = step FLOPs summed over the
data-parallel replicas / (step wall time * number of devices * peak FLOP/s per device).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from qwenvl_train.model.groups import PARTS, part_group

if TYPE_CHECKING:
    from qwenvl_train.model.config import LLMConfig, QwenVLConfig, VisionConfig


def vit_tokens(vision_cfg: VisionConfig, image_size: int) -> int:
    return (image_size // vision_cfg.patch_size) ** 2


def vit_flops(vision_cfg: VisionConfig, image_size: int) -> float:
    """Forward FLOPs of the ViT for one image of side `image_size`."""
    p, w = vision_cfg.patch_size, vision_cfg.width
    m, layers = vision_cfg.mlp_dim, vision_cfg.layers
    n = vit_tokens(vision_cfg, image_size)
    patch_embed = 2 * n * (3 * p * p) * w
    block = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * m
    return float(patch_embed + layers * block)


def _adapter_parts(model_cfg: QwenVLConfig, image_size: int) -> tuple[float, float]:
    """(cross-attention, ln_post @ proj) forward FLOPs per image."""
    vision, adapter = model_cfg.vision, model_cfg.adapter
    n, w = vit_tokens(vision, image_size), vision.width
    q, d = adapter.num_queries, adapter.embed_dim
    attn = (
        2 * n * w * d  # kv_proj
        + 2 * q * d * d  # query projection (the learned queries are projected per image)
        + 2 * 2 * n * d * d  # key and value projections
        + 2 * 2 * q * n * d  # scores and attn @ V
        + 2 * q * d * d  # out_proj
    )
    return float(attn), float(2 * q * d * d)


def adapter_flops(model_cfg: QwenVLConfig, image_size: int) -> float:
    """Forward FLOPs of the adapter (cross-attention + final projection) per image."""
    return sum(_adapter_parts(model_cfg, image_size))


def llm_layer_flops(llm_cfg: LLMConfig, seq_len: float, *,
                    attn_span: float | None = None) -> float:
    """Forward FLOPs of one decoder layer per token at context length `seq_len`.

    `attn_span` (keys per query) defaults to the causal average seq_len / 2."""
    h, a = llm_cfg.hidden_size, llm_cfg.num_heads
    kv, i = llm_cfg.num_kv_heads, llm_cfg.intermediate_size
    d = h // a
    span = seq_len / 2 if attn_span is None else attn_span
    qkv = 2 * h * (a * d + 2 * kv * d)
    attn = 2 * 2 * span * a * d
    return float(qkv + attn + 2 * h * a * d + 3 * 2 * h * i)


def lm_head_flops(llm_cfg: LLMConfig) -> float:
    """FLOPs of the output projection for one position."""
    return float(2 * llm_cfg.hidden_size * llm_cfg.vocab_size)


def llm_flops(llm_cfg: LLMConfig, seq_len: float, *, attn_span: float | None = None) -> float:
    """Forward FLOPs per token: all decoder layers + the lm_head."""
    return (llm_cfg.num_layers * llm_layer_flops(llm_cfg, seq_len, attn_span=attn_span)
            + lm_head_flops(llm_cfg))


def effective_segment_len(lengths: Sequence[int]) -> float:
    """Token-weighted mean segment length sum(l^2)/sum(l) of packed samples.

    Mean attention span per token over causal segments of lengths l is sum(l^2/2)/sum(l),
    so passing this as `segment_len` makes the per-token span exact."""
    total = sum(lengths)
    return float(sum(x * x for x in lengths) / total) if total else 0.0


def forward_flops_by_part(
    model_cfg: QwenVLConfig,
    image_size: int,
    tokens: int,
    images: int,
    seq_len: float,
    *,
    loss_tokens: int | None = None,
    segment_len: float | None = None,
) -> dict[str, float]:
    """Forward FLOPs of a batch per part of the registry's chain `PARTS`."""
    llm = model_cfg.llm
    ctx = seq_len if segment_len is None else segment_len
    head_positions = tokens if loss_tokens is None else loss_tokens
    attn, post = _adapter_parts(model_cfg, image_size)
    vit, adapter, adapter_post, llm_part = PARTS
    return {
        vit: images * vit_flops(model_cfg.vision, image_size),
        adapter: images * attn,
        adapter_post: images * post,
        llm_part: (tokens * llm.num_layers * llm_layer_flops(llm, ctx)
                   + head_positions * lm_head_flops(llm)),
    }


def part_multipliers(trainable: Iterable[str], post_group: str = "vit",
                     adapted: Iterable[str] = ()) -> dict[str, int]:
    """3 / 2 / 1 per part of the chain (see the module docstring); `adapted`: LoRA groups."""
    trainable, adapted = set(trainable), set(adapted)
    mult, seen_trained = {}, False
    for part in PARTS:  # in data-flow order: a part is "downstream" once a trained one passed
        group = part_group(part, post_group)
        if group in trainable:
            mult[part], seen_trained = (2 if group in adapted else 3), True
        else:
            mult[part] = 2 if seen_trained else 1
    return mult


def step_flops(
    model_cfg: QwenVLConfig,
    image_size: int,
    tokens: int,
    images: int,
    seq_len: float,
    trainable: Iterable[str],
    *,
    loss_tokens: int | None = None,
    segment_len: float | None = None,
    adapted: Iterable[str] = (),
) -> float:
    """Training FLOPs of a step over `tokens` LLM positions (pads included: they are
    computed) and `images` images; rows of length `seq_len`, or packed samples of
    token-weighted mean length `segment_len`. `loss_tokens`: positions with a label
    (where the lm_head runs); default all tokens. `adapted`: the LoRA groups."""
    post_group = model_cfg.adapter.post_group
    fwd = forward_flops_by_part(
        model_cfg, image_size, tokens, images, seq_len,
        loss_tokens=loss_tokens, segment_len=segment_len,
    )
    mult = part_multipliers(trainable, post_group, adapted)
    return float(sum(mult[p] * fwd[p] for p in PARTS))


# Dense (no structured sparsity) peak TFLOP/s per device, from the vendors' datasheets.
# fp32 is the non-tensor-core rate (torch's default for fp32 matmuls is no TF32).
# MI250/MI250X: torch sees each of the two dies (GCDs) as one device, so half a module.
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # Most specific names first: "A100" contains "A10", "H100 PCIe" contains "H100".
    ("H100 PCIE", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A10G", {}),  # different part from the A10; unknown here -> no MFU rather than wrong
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 / tf32 tensor cores
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
    ("MI250X", {"bf16": 191.5, "fp16": 191.5, "fp32": 47.9}),
    ("MI250", {"bf16": 181.0, "fp16": 181.0, "fp32": 45.3}),
)
_DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", str(torch.bfloat16): "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", str(torch.float16): "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", str(torch.float32): "fp32",
    "tf32": "tf32",
}


def peak_flops(
    device: str | torch.device | None,
    dtype: str | torch.dtype,
    override_tflops: float | None = None,
) -> float | None:
    """Peak dense FLOP/s of one device for `dtype`, or None when unknown (CPU, an
    unlisted GPU): MFU is then not reported. `override_tflops` (`tracking.peak_tflops`)
    wins over the table. `device` is a name as `torch.cuda.get_device_name()` gives it."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if isinstance(device, torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            return None
        device = torch.cuda.get_device_name(device)
    name = str(device or "").upper().replace("-", " ")
    if not name or name in ("CPU", "META", "MPS"):
        return None
    kind = _DTYPE_ALIASES.get(str(dtype).lower()) or _DTYPE_ALIASES.get(str(dtype))
    if kind is None:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: bf16, fp16, fp32, tf32")
    for key, table in _PEAK_TFLOPS:
        if key.replace("-", " ") in name:
            value = table.get(kind)
            return value * 1e12 if value else None
    return None
