"""Per-task loss accounting shared by the plain and the pipeline training steps."""

from __future__ import annotations

import torch

from qwenvl_train.data.schema import TASKS
from qwenvl_train.tokens import IGNORE_INDEX


def task_loss_sums(token_loss: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """[len(TASKS), 2]: summed token loss and number of loss tokens per task (fp64)."""
    device = token_loss.device if token_loss is not None else device
    sums = torch.zeros(len(TASKS), 2, device=device, dtype=torch.float64)
    if token_loss is None:
        return sums
    sel = labels != IGNORE_INDEX
    tasks = task_ids[sel].to(device)
    sums[:, 0].index_add_(0, tasks, token_loss[sel].detach().double())
    sums[:, 1].index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float64))
    return sums
