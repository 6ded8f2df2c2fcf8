"""Attention inputs for packed rows: segment ids -> what each LLM attention backend takes.

A row may hold several samples (`segment_ids` 1, 2, ...; 0 for padding). A token attends
causally within its own segment only. Padding (segment 0) forms a segment of its own, so
every query has at least itself to attend to (no all-masked softmax rows -> no NaN).
"""

from __future__ import annotations

import torch


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at every segment change along the row."""
    length = segment_ids.shape[1]
    idx = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - starts


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


def varlen_kwargs(segment_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """cu_seqlens over the flattened [B*L] tokens for flash-attention's varlen kernel.

    transformers' flash path flattens the batch when these kwargs are given, so each
    (row, segment) run becomes one sequence."""
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
    segment_ids: torch.Tensor | None, attn_implementation: str, dtype: torch.dtype
) -> dict[str, object]:
    """Extra kwargs for the transformers decoder so packed samples never see each other."""
    if segment_ids is None:
        return {}
    if attn_implementation == "flash_attention_2":
        return varlen_kwargs(segment_ids)
    mask = block_causal_mask(segment_ids)
    if attn_implementation == "eager":
        return {"attention_mask": additive_mask(mask, dtype)}
    return {"attention_mask": mask}  # a 4D mask is passed through by transformers as is
