"""Batched text generation for `QwenVL` through the transformers decoder's `generate`.

The image features are spliced into the prompt embeddings once (`QwenVL.embed_inputs`),
then `llm.generate(inputs_embeds=...)` decodes with its KV cache. Prompts are LEFT padded
so every row's next token sits in the last column; transformers derives the position ids
from the attention mask (cumsum - 1), so each row's real tokens get positions 0..n-1 as
in training, whatever its padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from qwenvl_train.data.tokenizer import QwenVLTokenizer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, L], attention_mask [B, L]), padding on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, length - len(p):] = 1
    return ids, mask


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its decoded continuation contains any stop string
    (the tokenizer is tiktoken-based, so transformers' own `stop_strings` cannot be used)."""

    def __init__(self, tokenizer: QwenVLTokenizer, stops: Sequence[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, list(stops), start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.start:].tolist()) for s in self.stops)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class OnlyTokenizerIds(LogitsProcessor):
    """Rules out the embedding's padding rows (ids 151,860..151,935, which the tokenizer does
    not have): a trained model never picks them, an untrained one may sample them."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(1, torch.arange(self.vocab_size, scores.shape[1],
                                                 device=scores.device), float("-inf"))


def stop_ids(tokenizer: QwenVLTokenizer, extra: Sequence[int] = ()) -> list[int]:
    """End-of-sequence ids: `<|endoftext|>` (base model), `<|im_end|>` (chat) and extras."""
    return [tokenizer.eod_id, tokenizer.im_end_id, *extra]


def cut_at_stop(ids: list[int], eos: Sequence[int]) -> list[int]:
    """Generated ids up to (excluding) the first end-of-sequence id."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def cut_at_strings(text: str, stops: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest stop string."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], images: torch.Tensor | None,
                 tokenizer: QwenVLTokenizer, *, max_new_tokens: int = 32,
                 eos_ids: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
                 do_sample: bool = False, top_p: float = 1.0, temperature: float = 1.0,
                 top_k: int | None = None, streamer: BaseStreamer | None = None,
                 logits_processor: Sequence[LogitsProcessor] = ()) -> list[list[int]]:
    """Continue each prompt; returns the new ids of each row, cut before the first eos id.

    `images` holds every image of the batch in row order ([N, 3, S, S], already normalised);
    the prompts must contain `N * num_queries` `<imgpad>` tokens in total. Greedy unless
    `do_sample` (then sampling with `temperature`, nucleus `top_p` and `top_k`). `streamer`
    receives the new ids as they are chosen (transformers' `put`/`end`; the first `put`
    holds the prompt ids, empty here); `logits_processor` runs after the sampling ones.
    """
    eos = list(eos_ids) if eos_ids is not None else stop_ids(tokenizer)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if images is not None:
        images = images.to(device=device, dtype=next(model.vit.parameters()).dtype)
    embeds = model.embed_inputs(ids, images)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        top_p=top_p if do_sample else None, temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None, eos_token_id=eos, pad_token_id=tokenizer.pad_id,
        use_cache=True)
    criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, 0)] if stop_strings
                                    else [])
    # With inputs_embeds and no input_ids the output holds only the generated tokens.
    out = model.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                             generation_config=gen_cfg, stopping_criteria=criteria,
                             logits_processor=LogitsProcessorList(logits_processor),
                             streamer=streamer)
    return [cut_at_stop(row.tolist(), eos) for row in out]


def generate(model, prompts: Sequence[Sequence[int]], images: torch.Tensor | None,
             tokenizer: QwenVLTokenizer, *, stop_strings: Sequence[str] = (),
             **kwargs) -> list[str]:
    """`generate_ids`, decoded (special tokens such as `<box>` kept) and cut at stop strings."""
    rows = generate_ids(model, prompts, images, tokenizer, stop_strings=stop_strings, **kwargs)
    return [cut_at_strings(tokenizer.decode(r), stop_strings) for r in rows]
