"""Fault injection for the crash-safety tests, as trainer callbacks (installed per run)."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import torch

from qwenvl_train.data.stream import DataError
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


class FailOnRank(TrainerCallback):
    """Rank `rank` raises after step `step`: a DataError ("data"), or a plain bug ("bug")."""

    def __init__(self, step: int, rank: int, kind: str = "data") -> None:
        self.step, self.rank, self.kind = step, rank, kind

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step and trainer.dist.rank == self.rank:
            if self.kind == "data":
                raise DataError(f"injected data failure on rank {self.rank}")
            raise RuntimeError(f"injected bug on rank {self.rank}")


class SleepOnRank(TrainerCallback):
    """Rank `rank` sleeps after step `step` (outside any collective, so no socket tells it
    that a peer died)."""

    def __init__(self, step: int, rank: int, seconds: float = 600) -> None:
        self.step, self.rank, self.seconds = step, rank, seconds

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step and trainer.dist.rank == self.rank:
            time.sleep(self.seconds)


class FreezeRank(TrainerCallback):
    """Rank `rank` writes its pid to `pid_file` and stops itself (SIGSTOP) after step
    `step`: alive, silent, its peers block in their next collective as on a hung NCCL."""

    def __init__(self, step: int, rank: int, pid_file: str) -> None:
        self.step, self.rank, self.pid_file = step, rank, pid_file

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if step == self.step and trainer.dist.rank == self.rank:
            Path(self.pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)


class DiskFullInSave(TrainerCallback):
    """Checkpoint `step` fails as a full disk fails it: ENOSPC while this rank writes."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint_written(self, trainer, step: int, path: Path) -> None:
        if step == self.step:
            target = path / "extra_state.bin"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
