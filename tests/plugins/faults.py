"""Fault injection for the crash-safety tests, as trainer callbacks (installed per run)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from qwenvl_train.training.callbacks import TrainerCallback


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(TrainerCallback):
    """SIGKILL every rank after step `step` was logged, before its checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            _kill()


class KillInSave(TrainerCallback):
    """SIGKILL every rank while checkpoint `step` is written (before `latest` moves)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint_written(self, trainer, step: int, path: Path) -> None:
        if step == self.step:
            _kill()


class NanLoss(TrainerCallback):
    """The last rank's loss becomes NaN at step `step` (every micro-batch of it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_loss(self, trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == self.step and trainer.dist.rank == trainer.dist.world_size - 1:
            return loss * float("nan")
        return loss
