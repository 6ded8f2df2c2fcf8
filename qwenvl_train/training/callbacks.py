"""Trainer callbacks: code of your own that runs at fixed points of the training loop.

Subclass `TrainerCallback`, override the events you need, and install it from the config:

    callbacks:                                   # configs/train.yaml, or on the command line:
      - mypkg.hooks.LogGradNorms                 #   'callbacks=[mypkg.hooks.LogGradNorms]'
      - {_target_: mypkg.hooks.Upload, every: 10}

An entry names an importable class or factory (`package.module.Name`), either alone or as
`_target_` with keyword arguments; it is called once per process and must return a
`TrainerCallback`. A name that does not import stops the launch with a message naming the
entry. Python callers of `training.run.run` may pass instances instead.

Every event runs on every rank, in the listed order, with the `Trainer` as first argument
(`trainer.cfg`, `.dist`, `.engine`, `.par`, `.state`). Steps count from 1.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenvl_train.checks import ConfigError

if TYPE_CHECKING:
    import torch

    from qwenvl_train.training.trainer import Trainer


class TrainerCallback:
    """The events of the loop; each default does nothing."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Set up, resumed (`trainer.state.step`), before the first step of this process."""

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss after the forward, before the non-finite check and the
        backward; return the loss to use. Not called under pipeline parallelism, where the
        loss is computed inside DeepSpeed's pipeline schedule."""
        return loss

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After step `step` was applied (or skipped) and logged; before its checkpoint."""

    def on_checkpoint_written(self, trainer: Trainer, step: int, path: Path) -> None:
        """This rank's files of checkpoint `path` are written; `latest` still names the
        previous one and moves once every rank returned, so files added here belong to it."""

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The stage finished or was preempted, exported and summarised (not on errors)."""


class CallbackList(TrainerCallback):
    """Runs each event of several callbacks in order; `on_loss` passes the loss along."""

    def __init__(self, callbacks: Iterable[TrainerCallback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_loss(self, trainer: Trainer, step: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.on_loss(trainer, step, loss)
        return loss

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, metrics)

    def on_checkpoint_written(self, trainer: Trainer, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint_written(trainer, step, path)

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_run_end(trainer, summary)


def load_callbacks(entries: Sequence[str | dict[str, Any]],
                   key: str = "callbacks") -> list[TrainerCallback]:
    """Import and build the callbacks a config lists (see the module docstring)."""
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            target, kwargs = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("_target_"), str):
            kwargs = {k: v for k, v in entry.items() if k != "_target_"}
            target = entry["_target_"]
        else:
            raise ConfigError(f"{where}: {entry!r} is neither 'package.module.Name' nor "
                              "{_target_: package.module.Name, <keyword arguments>}")
        factory = _locate(target, where)
        try:
            callback = factory(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: {target}({_args(kwargs)}) failed: {e}") from None
        if not isinstance(callback, TrainerCallback):
            raise ConfigError(f"{where}: {target}({_args(kwargs)}) returned "
                              f"{type(callback).__name__}, not a TrainerCallback subclass")
        out.append(callback)
    return out


def _locate(target: str, where: str):
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}: {target!r} is not a dotted name 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e}); is the package "
                          "installed or on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{where}: {module_name!r} has no class or function {attr!r}")
    return factory


def _args(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
