"""Pack same-task encoded samples into rows of `seq_len`, and collate rows into a batch.

Packing is first-fit over a small buffer of open rows per task, fully deterministic: a
sample goes into the oldest open row of its task with room; otherwise it opens a new row;
when a task has more than `buffer_rows` open rows, its fullest row (oldest on ties) is
emitted. A row that is exactly full is emitted at once. Samples are never split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import get_worker_info

from qwenvl_train.tokens import IGNORE_INDEX

from .encode import EncodedSample
from .images import normalize_into, stack_into
from .schema import TASK_INDEX


@dataclass(eq=False)  # rows compare by identity
class Row:
    task: str
    samples: list[EncodedSample] = field(default_factory=list)
    used: int = 0


class Packer:
    def __init__(self, seq_len: int, buffer_rows: int = 4):
        self.seq_len = seq_len
        self.buffer_rows = buffer_rows
        self.open: list[Row] = []  # in creation order, all tasks

    def add(self, s: EncodedSample) -> list[list[EncodedSample]]:
        """Place `s`; return the rows that became complete (possibly none)."""
        n = len(s)
        if n > self.seq_len:
            raise ValueError(f"{s.key}: {n} tokens > seq_len {self.seq_len}")
        row = next((r for r in self.open
                    if r.task == s.task and r.used + n <= self.seq_len), None)
        if row is None:
            row = Row(s.task)
            self.open.append(row)
        row.samples.append(s)
        row.used += n
        out = []
        if row.used == self.seq_len:
            out.append(self._emit(row))
        same = [r for r in self.open if r.task == s.task]
        if len(same) > self.buffer_rows:
            fullest = max(same, key=lambda r: r.used)  # max() keeps the first (oldest) tie
            out.append(self._emit(fullest))
        return out

    def _emit(self, row: Row) -> list[EncodedSample]:
        self.open.remove(row)
        return row.samples

    def state(self) -> list[tuple[str, list[tuple]]]:
        """Open rows as (task, sample addresses): enough to rebuild the buffer exactly."""
        return [(r.task, [s.address for s in r.samples]) for r in self.open]

    def restore(self, rows: list[tuple[str, list[EncodedSample]]]) -> None:
        self.open = [Row(task, list(ss), sum(len(s) for s in ss)) for task, ss in rows]


def _batch_images(images: list[torch.Tensor], size: int, normalize: bool) -> torch.Tensor:
    """Per-sample uint8 images -> one tensor [N, 3, S, S]: CLIP-normalised float, or uint8
    (`normalize=False`; `normalize_batch_images` finishes it later)."""
    n = sum(int(x.shape[0]) for x in images)
    dtype = torch.float32 if normalize else torch.uint8
    if get_worker_info() is not None and n:
        # In a DataLoader worker, build the batch in shared memory directly: otherwise
        # sending it to the trainer copies it once more (the default collate does this too).
        storage = torch.UntypedStorage._new_shared(n * 3 * size * size * dtype.itemsize)
        out = torch.empty(0, dtype=dtype).set_(storage).view(n, 3, size, size)
    else:
        out = torch.empty((n, 3, size, size), dtype=dtype)
    return normalize_into(out, images) if normalize else stack_into(out, images)


def normalize_batch_images(batch: dict) -> dict:
    """A batch collated with `normalize=False` -> its images CLIP-normalised float (the
    same values `collate` would have written)."""
    images = batch["images"]
    if images.dtype == torch.uint8:
        batch["images"] = normalize_into(torch.empty(images.shape), [images])
    return batch


def collate(rows: list[list[EncodedSample]], pad_id: int, image_size: int,
            length: int | None = None, pad_to_multiple_of: int = 1,
            max_len: int | None = None, normalize: bool = True) -> dict:
    """Rows of samples -> the batch dict of docs/contracts.md.

    `length`: fixed row length (packing); otherwise the longest row rounded up to
    `pad_to_multiple_of` (capped at `max_len`). `normalize=False` leaves the images uint8.
    """
    lens = [sum(len(s) for s in row) for row in rows]
    if length is None:
        m = pad_to_multiple_of
        length = -(-max(lens) // m) * m
        if max_len is not None:
            length = min(length, max(max_len, max(lens)))
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((b, length), dtype=torch.long)
    segment_ids = torch.zeros((b, length), dtype=torch.long)
    task_ids = torch.full((b, length), -1, dtype=torch.long)
    images, keys, sources = [], [], []
    for i, row in enumerate(rows):
        pos = 0
        for seg, s in enumerate(row, start=1):
            n = len(s)
            input_ids[i, pos:pos + n] = s.input_ids
            labels[i, pos:pos + n] = s.labels
            position_ids[i, pos:pos + n] = torch.arange(n)
            segment_ids[i, pos:pos + n] = seg
            task_ids[i, pos:pos + n] = TASK_INDEX[s.task]
            pos += n
            if s.images.shape[0]:
                images.append(s.images)
            keys.append(s.key)
            sources.append(s.source)
        # Pads continue counting from the last sample's last position.
        last = int(position_ids[i, pos - 1]) + 1 if pos else 0
        position_ids[i, pos:] = torch.arange(last, last + length - pos)
    imgs = _batch_images(images, image_size, normalize)
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "segment_ids": segment_ids, "images": imgs, "task_ids": task_ids,
        "keys": keys, "sources": sources, "num_samples": len(keys),
        "num_images": int(imgs.shape[0]), "num_real_tokens": int(sum(lens)),
        # for cost estimates (balance.py): label positions, sum of squared sample lengths
        "num_loss_tokens": int(sum(int((s.labels != IGNORE_INDEX).sum()) for r in rows
                                   for s in r)),
        "seg_sq_tokens": sum(len(s) ** 2 for r in rows for s in r),
    }
