"""Pieces -> input_ids / labels (the ONE masking code path), truncation, encoded samples.

Labels are aligned with input_ids (not shifted; the model shifts), -100 = no loss. The
label of a sample's first token is always -100: nothing precedes it, and in a packed row
the token before it belongs to another sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qwenvl_train.tokens import IGNORE_INDEX

from .schema import Sample, SampleError
from .templates import ImageSlot, Piece, Special, render
from .tokenizer import QwenVLTokenizer


@dataclass
class Tokens:
    input_ids: list[int]
    labels: list[int]
    image_order: list[int]  # sample image index of each <img> span, in order of appearance
    image_spans: list[tuple[int, int]]  # [start, end) of each <img>..</img> span


@dataclass(eq=False)
class EncodedSample:
    input_ids: torch.Tensor  # long [L]
    labels: torch.Tensor  # long [L]
    # uint8 [n, 3, S, S], resized, not normalised: batches stay uint8 (4x smaller than
    # float) and the model normalises on its device (model/vision.py:normalize_images).
    images: torch.Tensor
    task: str
    source: str
    key: str
    address: tuple = field(default=())  # where the loader found it (for exact resume)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pieces_to_ids(pieces: list[Piece], tokenizer: QwenVLTokenizer,
                  num_image_tokens: int) -> Tokens:
    ids: list[int] = []
    labels: list[int] = []
    order: list[int] = []
    spans: list[tuple[int, int]] = []
    for seg, has_loss in pieces:
        if isinstance(seg, ImageSlot):
            if has_loss:
                raise ValueError("image spans never carry loss")
            start = len(ids)
            toks = ([tokenizer.img_start_id] + [tokenizer.img_pad_id] * num_image_tokens
                    + [tokenizer.img_end_id])
            order.append(seg.index)
            spans.append((start, start + len(toks)))
        elif isinstance(seg, Special):
            toks = [tokenizer.token_id(seg.token)]
        else:
            toks = tokenizer.encode(seg)  # data text: special-token strings stay text
        ids += toks
        labels += toks if has_loss else [IGNORE_INDEX] * len(toks)
    if labels:
        labels[0] = IGNORE_INDEX
    return Tokens(ids, labels, order, spans)


def truncate(tokens: Tokens, seq_len: int, key: str = "") -> Tokens:
    """Cut trailing text to `seq_len`; never cut or drop an image span (-> too_long)."""
    n = len(tokens.input_ids)
    if n <= seq_len:
        return tokens
    if any(end > seq_len for _, end in tokens.image_spans):
        raise SampleError("too_long", f"{key}: {n} tokens > {seq_len} and an image span "
                          "would be cut")
    labels = tokens.labels[:seq_len]
    if labels.count(IGNORE_INDEX) == len(labels):
        raise SampleError("too_long", f"{key}: {n} tokens > {seq_len}, no loss token left")
    return Tokens(tokens.input_ids[:seq_len], labels, tokens.image_order, tokens.image_spans)


def encode_tokens(sample: Sample, template: str, tokenizer: QwenVLTokenizer,
                  num_image_tokens: int, seq_len: int) -> Tokens:
    """Render + tokenise + truncate (no image decoding: decide `too_long` cheaply first)."""
    tokens = pieces_to_ids(render(sample, template), tokenizer, num_image_tokens)
    if tokens.labels.count(IGNORE_INDEX) == len(tokens.labels):  # count(): C speed
        raise SampleError("bad_record", f"{sample.key}: renders without any loss token")
    return truncate(tokens, seq_len, sample.key)


def to_encoded(sample: Sample, tokens: Tokens, images: torch.Tensor,
               address: tuple = ()) -> EncodedSample:
    # Through numpy: 3x faster than torch.tensor(list) on a few hundred ints.
    return EncodedSample(
        input_ids=torch.from_numpy(np.array(tokens.input_ids, dtype=np.int64)),
        labels=torch.from_numpy(np.array(tokens.labels, dtype=np.int64)),
        images=images, task=sample.task, source=sample.source, key=sample.key,
        address=address)
