"""Attention inputs for packed rows: segment ids -> what each LLM attention backend takes.

A row may hold several samples (`segment_ids` 1, 2, ...; 0 for padding). A token attends
causally within its own segment only. Padding (segment 0) forms a segment of its own, so
every query has at least itself to attend to (no all-masked softmax rows -> no NaN).
Segments are contiguous runs along the row (the packer writes them so).

Backends (`model.attn_implementation`), and what each gets, built ONCE per batch and shared
by every decoder layer:
  flex               a FlexAttention BlockMask built from the segment runs in
                     O((L/128)^2) -- never an [L, L] tensor; the kernel skips blocks
                     that cross samples. Trains on CUDA only (PyTorch has no CPU backward
                     for FlexAttention); forward runs on CPU too (unfused: it materialises
                     the scores there).
  flash_attention_2  cu_seqlens of the (row, segment) runs for flash-attn's varlen kernel.
  sdpa               a dense boolean [B, 1, L, L] mask (the fallback; memory quadratic in L).
  eager              the same mask, additive.
`auto` resolves to flash_attention_2 (CUDA with flash_attn installed), flex (CUDA) or sdpa.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    flex_attention,
)
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

# Our FlexAttention entry in transformers' attention registry (see flex_attention_forward).
HF_FLEX = "qwenvl_flex"


def resolve_attn_implementation(name: str, on_cuda: bool | None = None) -> str:
    """`model.attn_implementation` -> the backend used: `auto` picks flash_attention_2 on
    CUDA when `flash_attn` is installed, else flex on CUDA, else sdpa."""
    if name != "auto":
        return name
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    if not on_cuda:
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex"


def hf_attn_implementation(backend: str) -> str:
    """The name transformers' Qwen2 config takes for a resolved backend."""
    return HF_FLEX if backend == "flex" else backend


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at every segment change along the row."""
    length = segment_ids.shape[1]
    idx = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] run index along each row (0, 0, 1, 1, 1, 2, ...): non-decreasing, so two
    tokens share a segment iff they share a run."""
    change = torch.zeros_like(segment_ids)
    change[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]).to(segment_ids.dtype)
    return change.cumsum(dim=1)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask, True = may attend (the form SDPA takes)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 / dtype min), the form eager attention takes."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


def flex_block_mask(segment_ids: torch.Tensor,
                    block_size: int = _DEFAULT_SPARSE_BLOCK_SIZE) -> BlockMask:
    """The document-causal BlockMask of packed rows, from the segment runs alone.

    With runs non-decreasing, query block i and key block j <= i share a sample iff the
    run at the end of j equals the run at the start of i; they are FULL (no per-element
    mask needed) iff j < i and one run spans from the start of j to the end of i. Work
    and memory are O(B (L/block)^2) -- nothing of size L x L is built -- and there is no
    host sync. Equal to `create_block_mask` with the same mask_mod (tested)."""
    batch, length = segment_ids.shape
    device = segment_ids.device
    runs = segment_runs(segment_ids)
    num_blocks = -(-length // block_size)
    starts = torch.arange(num_blocks, device=device) * block_size
    ends = (starts + block_size).clamp(max=length) - 1
    first, last = runs[:, starts], runs[:, ends]  # [B, nb] run at each block's ends
    q_blk = torch.arange(num_blocks, device=device)[:, None]
    kv_blk = torch.arange(num_blocks, device=device)[None, :]
    meets = (kv_blk <= q_blk) & (last[:, None, :] >= first[:, :, None])  # [B, q, kv]
    full = (kv_blk < q_blk) & (first[:, None, :] == last[:, :, None])
    if length % block_size:
        full[:, -1] = False  # a ragged last query block: let the mask_mod decide
    partial = meets & ~full

    def blocks(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = sel.sum(dim=-1, dtype=torch.int32)[:, None]  # [B, 1 head, q]
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # selected first
        return count, order.to(torch.int32)[:, None]

    # Key/query indices past the row's end (the ragged last block) must never match.
    padded = F.pad(runs, (0, num_blocks * block_size - length), value=-1)

    def same_sample_causal(b, h, q_idx, kv_idx):  # noqa: ARG001 (flex's mask_mod signature)
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    kv_count, kv_index = blocks(partial)
    full_count, full_index = blocks(full)
    return BlockMask.from_kv_blocks(kv_count, kv_index, full_count, full_index,
                                    BLOCK_SIZE=block_size, mask_mod=same_sample_causal,
                                    seq_lengths=(length, length))


_compiled_flex = None


def _flex_kernel(device: torch.device):
    """Compiled FlexAttention on accelerators (the fused kernel; eager flex materialises
    the scores), eager on CPU (forward-only there) and inside an outer torch.compile."""
    global _compiled_flex
    if device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for `HF_FLEX`. A BlockMask (training, packed rows)
    runs FlexAttention; anything else -- the dense masks transformers builds for
    generation with a KV cache -- runs SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("FlexAttention here takes no attention dropout")
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise NotImplementedError(
            "model.attn_implementation=flex trains on CUDA only (PyTorch's FlexAttention "
            "has no CPU backward); use auto or sdpa on CPU")
    out = _flex_kernel(query.device)(query, key, value, block_mask=attention_mask,
                                     scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(HF_FLEX, flex_attention_forward)
# Generation builds its masks through the registry: give it SDPA's (see above).
AttentionMaskInterface.register(HF_FLEX, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def varlen_kwargs(segment_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """cu_seqlens over the flattened [B*L] tokens for flash-attention's varlen kernel.

    transformers' flash path flattens the batch when these kwargs are given, so each
    (row, segment) run becomes one sequence. (`max_length` is one host sync per batch.)"""
    b, length = segment_ids.shape
    flat = segment_ids.reshape(-1)
    idx = torch.arange(b * length, device=flat.device)
    start = idx % length == 0
    start[1:] |= flat[1:] != flat[:-1]
    cu = torch.cat([idx[start], idx.new_tensor([b * length])]).to(torch.int32)
    max_len = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len,
            "max_length_k": max_len}


def llm_attention_inputs(
    segment_ids: torch.Tensor | None, backend: str, dtype: torch.dtype
) -> dict[str, object]:
    """Extra kwargs for the transformers decoder so packed samples never see each other.
    `backend` is resolved (not `auto`). Build once per batch; every layer takes the same."""
    if segment_ids is None:
        return {}
    if backend == "flex":
        return {"attention_mask": flex_block_mask(segment_ids)}
    if backend == "flash_attention_2":
        return varlen_kwargs(segment_ids)
    mask = block_causal_mask(segment_ids)
    if backend == "eager":
        return {"attention_mask": additive_mask(mask, dtype)}
    return {"attention_mask": mask}  # a 4D mask is passed through by transformers as is


class BatchAttentionInputs:
    """Builds `llm_attention_inputs` once per batch where layers are called one by one
    (the pipeline's decoder layers): the layers of a stage pass the same `carrier` tensor
    along (the one the segment ids ride in), so the inputs are rebuilt only when a new
    carrier arrives."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.builds = 0  # how many times the inputs were built (tests count them)
        self._carrier: torch.Tensor | None = None
        self._inputs: dict[str, object] = {}

    def __call__(self, carrier: torch.Tensor, segments: torch.Tensor,
                 dtype: torch.dtype) -> dict[str, object]:
        if carrier is not self._carrier:
            self._carrier = carrier  # held, so its id cannot be reused by a new tensor
            self._inputs = llm_attention_inputs(segments, self.backend, dtype)
            self.builds += 1
        return dict(self._inputs)
