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
from .images import stack_into
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


def _batch_images(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Per-sample uint8 images -> one uint8 tensor [N, 3, S, S].

    The batch stays uint8: 4x fewer bytes from the workers than float, and the model
    normalises on its device (model/vision.py:normalize_images)."""
    n = sum(int(x.shape[0]) for x in images)
    if get_worker_info() is not None and n:
        # In a DataLoader worker, build the batch in shared memory directly: otherwise
        # sending it to the trainer copies it once more (the default collate does this too).
        storage = torch.UntypedStorage._new_shared(n * 3 * size * size)
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(n, 3, size, size)
    else:
        out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    return stack_into(out, images)


def collate(rows: list[list[EncodedSample]], pad_id: int, image_size: int,
            length: int | None = None, pad_to_multiple_of: int = 1,
            max_len: int | None = None) -> dict:
    """Rows of samples -> the batch dict of docs/contracts.md.

    `length`: fixed row length (packing); otherwise the longest row rounded up to
    `pad_to_multiple_of` (capped at `max_len`). Images stay uint8.
    """
    lens = [sum(len(s) for s in row) for row in rows]
    if length is None:
        m = pad_to_multiple_of
        length = -(-max(lens) // m) * m
        if max_len is not None:
            length = min(length, max(max_len, max(lens)))
    b = len(rows)
    samples = [s for row in rows for s in row]
    # Where each sample starts (flat index into [b, length]), its segment number and task,
    # and where its row's last sample starts: then every field is one scatter per batch
    # (per-sample slice assignments cost more than decoding a small image).
    first, segment, task, last_start = [], [], [], []
    for i, row in enumerate(rows):
        pos = 0
        for seg, smp in enumerate(row, start=1):
            first.append(i * length + pos)
            segment.append(seg)
            task.append(TASK_INDEX[smp.task])
            pos += len(smp)
        last_start.append(pos - len(row[-1]) if row else 0)
    n = torch.tensor([len(smp) for smp in samples], dtype=torch.long)
    starts = torch.cumsum(n, 0) - n
    total = int(n.sum())
    within = torch.arange(total) - torch.repeat_interleave(starts, n)  # position in sample
    dest = torch.repeat_interleave(torch.tensor(first, dtype=torch.long), n) + within

    def scatter(fill: int | torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        out = (torch.full((b * length,), fill, dtype=torch.long) if isinstance(fill, int)
               else fill.reshape(-1).clone())
        out[dest] = values
        return out.view(b, length)

    cat = lambda name: torch.cat([getattr(smp, name) for smp in samples])  # noqa: E731
    input_ids = scatter(pad_id, cat("input_ids"))
    labels = scatter(IGNORE_INDEX, cat("labels"))
    # Pads continue counting from the last sample's last position: column c holds
    # c - (start of the row's last sample).
    pad_positions = torch.arange(length)[None] - torch.tensor(last_start)[:, None]
    position_ids = scatter(pad_positions, within)
    segment_ids = scatter(0, torch.repeat_interleave(torch.tensor(segment), n))
    task_ids = scatter(-1, torch.repeat_interleave(torch.tensor(task), n))
    images = [smp.images for smp in samples if smp.images.shape[0]]
    keys = [smp.key for smp in samples]
    sources = [smp.source for smp in samples]
    imgs = _batch_images(images, image_size)
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
