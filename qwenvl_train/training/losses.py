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
    # Every position is added, weighted 0 where there is no label (pads have task -1, sent
    # to task 0 with weight 0): no boolean indexing, so no host sync on accelerators.
    sel = (labels != IGNORE_INDEX).to(device).reshape(-1)
    tasks = task_ids.to(device).reshape(-1).clamp(min=0)
    weight = sel.double()
    sums[:, 0].index_add_(0, tasks, token_loss.detach().reshape(-1).double() * weight)
    sums[:, 1].index_add_(0, tasks, weight)
    return sums
