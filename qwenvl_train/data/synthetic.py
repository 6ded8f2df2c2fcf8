"""Synthetic packed batches for checks and benchmarks that need no data set
(scripts/gpu_check.py, the planner's tests): random tokens and uint8 images laid out as the
Qwen-VL format lays out samples, put into rows by the real `collate`, so the batch is the
contract's (docs/contracts.md) in every field."""

from __future__ import annotations

import torch

from qwenvl_train.tokens import EOD_ID, IGNORE_INDEX, IMG_END_ID, IMG_PAD_ID, IMG_START_ID

from .encode import EncodedSample
from .packing import collate

TEXT_VOCAB = 150_000  # random text ids stay below the special tokens


def synthetic_sample(length: int, num_queries: int, image_size: int, label_tokens: int,
                     gen: torch.Generator, key: str = "synthetic") -> EncodedSample:
    """`<img>` + `num_queries` slots + `</img>` + text, one image; the last `label_tokens`
    tokens carry labels (a caption after its image)."""
    span = num_queries + 2
    if length < span + label_tokens + 1:
        raise ValueError(f"a sample of {length} tokens cannot hold an image span ({span}) "
                         f"and {label_tokens} label tokens")
    ids = torch.randint(0, TEXT_VOCAB, (length,), generator=gen)
    ids[0], ids[1:span - 1], ids[span - 1] = IMG_START_ID, IMG_PAD_ID, IMG_END_ID
    labels = torch.full((length,), IGNORE_INDEX)
    labels[length - label_tokens:] = ids[length - label_tokens:]
    images = torch.randint(0, 256, (1, 3, image_size, image_size), generator=gen,
                           dtype=torch.uint8)
    return EncodedSample(ids, labels, images, "caption", "synthetic", key)


def synthetic_batch(rows: int, seq_len: int, samples_per_row: int, num_queries: int,
                    image_size: int, label_tokens: int, seed: int = 0) -> dict:
    """`rows` rows of `seq_len` tokens, each packed full with `samples_per_row` samples
    (one image each, `label_tokens` labels each), collated as the loader does."""
    gen = torch.Generator().manual_seed(seed)
    per = seq_len // samples_per_row
    lengths = [per] * (samples_per_row - 1) + [seq_len - per * (samples_per_row - 1)]
    packed = [[synthetic_sample(n, num_queries, image_size, label_tokens, gen,
                                key=f"synthetic-{seed}-{r}-{i}")
               for i, n in enumerate(lengths)] for r in range(rows)]
    return collate(packed, EOD_ID, image_size, length=seq_len)
