"""The training loop: one trainer for every stage; the stage config decides what differs.

Read top to bottom: `run` sets up (distributed, data, model, freezing, optimizer, DeepSpeed,
resume), then `Trainer.fit` loops: micro-batches -> forward -> agreed NaN check -> backward
-> DeepSpeed step (clip, accumulate, schedule) -> log -> checkpoint.

A non-finite loss skips the whole step on every layout: no parameter, optimizer moment or
optimizer step count changes, while the LR schedule follows the trainer's step counter. Callbacks
(training/callbacks.py) run user code at the loop's events.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from qwenvl_train.checks import RunError
from qwenvl_train.config import TrainConfig
from qwenvl_train.data.schema import REASONS, TASKS
from qwenvl_train.model.vision import normalize_images
from qwenvl_train.tokens import IGNORE_INDEX
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training import failfast
from qwenvl_train.training.callbacks import CallbackList, TrainerCallback
from qwenvl_train.training.losses import task_loss_sums
from qwenvl_train.training.optim import boundary_grad_norm, lr_by_module_group, skipped_update
from qwenvl_train.training.parallel.engine import DistInfo

log = logging.getLogger("qwenvl_train")

_DATA_COUNTERS = ("filtered", "samples", "images", "tokens", "slots", "rows", "batches")
_MODEL_INPUTS = ("input_ids", "labels", "position_ids", "segment_ids", "images")


class NonFiniteLossError(RunError):
    pass


@dataclass
class TrainState:
    """What a checkpoint restores besides model/optimizer/scheduler (per rank)."""

    step: int = 0
    loader: dict = field(default_factory=dict)
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    meter: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """What one optimizer step reports, the same on every layout."""

    loss: float  # mean over the step's micro-batches and the data-parallel replicas
    applied: bool  # False: the update was skipped (non-finite loss or gradients)
    lr: dict[str, float]  # max LR per module group (vit/adapter/llm); 0.0 when skipped
    task_sums: torch.Tensor  # [len(TASKS), 2] on the host: token loss sum, tokens; all replicas
    counts: dict[str, int]  # this replica's samples, images, tokens, ... (throughput, MFU)
    time: float  # wall seconds
    grad_norm: float | None = None  # pre-clip; None where DeepSpeed tracks none (ZeRO-0 fp32)
    data: dict[str, float] = field(default_factory=dict)  # data/* counters, all readers
    stop: bool = False  # a stop signal reached some rank: save and return (all agree)


class PreemptionFlag:
    """A stop request, checked at step boundaries: SIGTERM (SLURM sends it before
    preemption) and the first Ctrl-C (SIGINT) let the step finish, save and return; a
    SIGINT while a stop is pending raises KeyboardInterrupt at once (nothing more saved)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.signum: int | None = None  # the first stop signal this process received
        self.announce = announce
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        failfast.watch_signals()  # a rank blocked in a collective still ends (failfast.py)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        if signum == signal.SIGINT and self.announce:  # os.write: safe in a signal handler
            os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint "
                        b"(Ctrl-C again to abort without saving)\n")

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop on another rank"

    def close(self) -> None:
        """Give the signals back to the handlers they had before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the lines of `path` (metrics.jsonl) past `step`, and lines a kill cut short;
    atomically: a crash leaves the old file or the new one."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {key: batch[key].to(device, non_blocking=True) for key in _MODEL_INPUTS}
    out["images"] = normalize_images(out["images"], dtype)  # uint8 or float -> dtype
    return out


def _any_rank(flag: torch.Tensor | bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on any (one sync)."""
    t = torch.as_tensor(flag, device=device).float().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, engine, par, loader, data,
                 tracker, meter, accum: int, dummy_batch: dict, state: TrainState,
                 callbacks: Sequence[TrainerCallback] = ()):
        """`par` is the layout (training/parallel/parallelize.py); `loader` is None on
        ranks that do not read data (pipeline/TP peers); `data` yields this rank's micro-batches;
        `callbacks` run at the loop's events (training/callbacks.py)."""
        self.cfg, self.dist, self.engine, self.par = cfg, dist_info, engine, par
        self.loader, self.data = loader, data
        self.tracker, self.meter = tracker, meter
        self.accum, self.dummy_batch, self.state = accum, dummy_batch, state
        self.callbacks = CallbackList(callbacks)
        self.param_dtype = next(engine.module.parameters()).dtype
        self.preempt = PreemptionFlag(announce=dist_info.is_main)
        self.metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
        if dist_info.is_main:  # steps past the restored one are trained and logged again
            keep_metrics_up_to(self.metrics_path, state.step)

    # -- one optimizer step -------------------------------------------------------------
    def _micro_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Forward + backward of one micro-batch; returns (loss, per-task sums, finite)."""
        inputs = _to_device(batch, self.dist.device, self.param_dtype)
        out = self.engine(**inputs)
        out.loss = self.callbacks.on_loss(self, self.state.step + 1, out.loss)
        # Every rank must take the same path, or the collectives inside backward hang.
        if _any_rank(~torch.isfinite(out.loss.detach())):
            self._report_nonfinite(batch, out.loss)
            # Backprop a zero loss of a tiny clean batch: the same hooks and collectives as
            # a real backward, zero gradient. The step's update is then skipped.
            dummy = self.engine(**_to_device(self.dummy_batch, self.dist.device,
                                             self.param_dtype))
            self.engine.backward(dummy.loss * 0.0)
            zeros = task_loss_sums(device=self.dist.device)
            return torch.zeros((), device=self.dist.device), zeros, False
        self.engine.backward(out.loss)
        sums = task_loss_sums(out.token_loss, batch["task_ids"], inputs["labels"])
        return out.loss.detach(), sums, True

    def _report_nonfinite(self, batch: dict, loss: torch.Tensor) -> None:
        msg = (f"non-finite loss at step {self.state.step + 1} on rank {self.dist.rank} "
               f"(local loss {loss.item()}); batch keys: {batch.get('keys', [])[:16]}")
        log.error(msg)
        if self.cfg.nan_policy == "stop":
            raise NonFiniteLossError(f"{msg}; nan_policy=stop")

    def _count_step(self, applied: bool) -> None:
        """Consecutive skipped steps (not micro-batches) against max_consecutive_nan."""
        if applied:
            self.state.consecutive_nonfinite = 0
            return
        self.state.skipped_steps += 1
        self.state.consecutive_nonfinite += 1
        if self.state.consecutive_nonfinite > self.cfg.max_consecutive_nan:
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps skipped for non-finite "
                f"loss or gradients (max_consecutive_nan={self.cfg.max_consecutive_nan})")

    def _optimizer_step(self, data_iter) -> StepResult:
        t0 = time.perf_counter()
        losses, finite, batches = [], True, []
        task_sums = task_loss_sums(device=self.dist.device)
        for micro in range(self.accum):
            batch = next(data_iter)
            batches.append(batch)
            loss, sums, micro_finite = self._micro_step(batch)
            finite &= micro_finite
            losses.append(loss)
            task_sums += sums
            if micro < self.accum - 1:
                self.engine.step()  # DeepSpeed counts the micro-step; the update waits
        lrs = lr_by_module_group(self.engine.optimizer)  # what this update uses
        grad_norm = boundary_grad_norm(self.engine, self.par)  # before clipping
        # The boundary: DeepSpeed clips, updates, zeroes the gradients and steps the
        # schedule. After a non-finite loss it runs all that except the update itself.
        with nullcontext() if finite else skipped_update(self.engine.basic_optimizer):
            self.engine.step()
        # DeepSpeed may also skip an update itself (overflowing gradients).
        applied = finite and self.engine.was_step_applied()
        if finite and not applied:
            # It then leaves the scheduler alone; keep the schedule on `state.step`.
            self.engine.lr_scheduler.step()
        return StepResult(
            **self._step_totals(torch.stack(losses).mean(), task_sums,
                                grad_norm if grad_norm is not None
                                else self.engine.get_global_grad_norm(), per_replica=True),
            applied=applied, lr=lrs if applied else dict.fromkeys(lrs, 0.0),
            counts=_counts(batches), time=time.perf_counter() - t0)

    def _pipeline_step(self, data) -> StepResult:
        """Pipeline layouts: DeepSpeed's train_batch runs the micro-batch schedule; a
        non-finite gradient norm makes ZeRO-1 skip the update on every stage."""
        t0 = time.perf_counter()
        lrs = lr_by_module_group(self.engine.optimizer)
        out = self.par.train_step(self.engine, data)
        applied = not out["skipped"] and out["finite"]
        if not applied:
            keys = [k for b in out["batches"] for k in b.get("keys", [])]
            self._report_nonfinite({"keys": keys}, torch.tensor(out["loss"]))
            if out["skipped"]:
                # DeepSpeed does not step the scheduler on a skipped update; keep the
                # schedule on `state.step` as the other layouts do.
                self.engine.lr_scheduler.step()
        return StepResult(
            **self._step_totals(out["loss"], out["task_sums"], out["grad_norm"],
                                per_replica=False),
            applied=applied, lr=lrs if applied else dict.fromkeys(lrs, 0.0),
            counts=_counts(out["batches"]), time=time.perf_counter() - t0)

    def _step_totals(self, loss, task_sums: torch.Tensor, grad_norm, *,
                     per_replica: bool) -> dict:
        """Everything the step reports that involves other ranks, in ONE all-reduce and ONE
        device-to-host copy: the loss (mean over data-parallel replicas), per-task loss sums,
        the grad norm, the data counters of every reader, and whether a stop signal reached
        any rank. (The per-micro-batch NaN agreement stays separate: backward needs it.)

        `per_replica`: loss / task sums are this replica's; one rank per replica (tensor
        rank 0) contributes them. Otherwise they are global already (the pipeline step) and
        rank 0 contributes them. The grad norm is the same everywhere; rank 0 contributes."""
        device, tasks = self.dist.device, len(TASKS)
        contributes = (self.par.grid.get_slice_parallel_rank() == 0 if per_replica
                       else self.dist.rank == 0)
        stats = self.loader.stats() if self.loader is not None else {}
        host = [float(stats.get(k, 0)) for k in _DATA_STAT_KEYS]
        host.append(float(self.preempt.requested))
        norm = float("nan") if grad_norm is None else grad_norm
        own = torch.cat([torch.as_tensor(loss, dtype=torch.float64, device=device).reshape(1),
                         task_sums.to(device, torch.float64).reshape(-1),
                         torch.as_tensor(norm, dtype=torch.float64, device=device).reshape(1)])
        mine = torch.tensor([contributes] * (1 + 2 * tasks) + [self.dist.rank == 0])
        own = torch.where(mine.to(device), own, torch.zeros_like(own))  # NaN * 0 is NaN
        values = torch.cat([own, torch.tensor(host, dtype=torch.float64).to(device)])
        dist.all_reduce(values)
        values = values.tolist()  # the step's one host sync for metrics
        loss_sum, sums = values[0], values[1:1 + 2 * tasks]
        norm, data = values[1 + 2 * tasks], values[2 + 2 * tasks:]
        dp = self.par.sizes.dp if per_replica else 1
        return {"loss": loss_sum / dp,
                "task_sums": torch.tensor(sums, dtype=torch.float64).reshape(tasks, 2),
                "grad_norm": None if grad_norm is None else norm,
                "data": _data_stats(dict(zip(_DATA_STAT_KEYS, data[:-1], strict=True))),
                "stop": data[-1] > 0}

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, state = self.cfg, self.state
        last = {}
        self.callbacks.on_train_start(self)
        while state.step < cfg.stage.steps:
            if self.par.is_pipeline:
                result = self._pipeline_step(self.data)
            else:
                result = self._optimizer_step(self.data)
            self._count_step(result.applied)
            state.step += 1
            last = self._log(result)
            self.callbacks.on_step_end(self, state.step, last)
            stop = result.stop  # a stop signal on any rank, agreed in the step's reduction
            failfast.progress()
            at_end = state.step == cfg.stage.steps
            if stop or at_end or state.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if stop:
                if self.dist.is_main:
                    log.warning("%s: checkpoint saved at step %d; to resume, rerun the same "
                                "command (run_dir=%s)", self.preempt.describe(), state.step,
                                cfg.run_dir)
                last["preempted"] = True
                if self.preempt.signum:
                    last["stop_signal"] = int(self.preempt.signum)
                break
        return last

    def save(self) -> None:
        # Every virtual stream's position (a collective over the readers); rank 0 writes it.
        data_state = self.loader.state_dict() if self.loader is not None else None
        self.state.meter = self.meter.state_dict()
        step = self.state.step
        with failfast.busy():
            ckpt.save(self.engine, self.cfg.run_dir, step, vars(self.state).copy(),
                      self.dist.rank, self.cfg.checkpoint.keep_last,
                      on_written=lambda path: self.callbacks.on_checkpoint_written(self, step,
                                                                                   path),
                      data_state=data_state, par=self.par)

    def _log(self, result: StepResult) -> dict:
        step = self.state.step
        sums = result.task_sums.tolist()  # on the host already
        metrics = {"loss": result.loss, "skipped_steps": self.state.skipped_steps}
        for t, task in enumerate(TASKS):
            if sums[t][1] > 0:
                metrics[f"loss/{task}"] = sums[t][0] / sums[t][1]
        for group, lr in result.lr.items():
            metrics[f"lr/{group}"] = lr
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        metrics.update(self.meter.update(result.counts, result.time))
        metrics.update(result.data)
        if self.dist.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.cfg.log_every == 0 or step == self.cfg.stage.steps:
            self.tracker.log(step, metrics)
        return metrics


_DATA_STAT_KEYS = (*_DATA_COUNTERS, *(f"skipped_{r}" for r in REASONS))


def _data_stats(totals: dict[str, float]) -> dict[str, float]:
    """Loader counters summed over all readers -> the logged data metrics."""
    out = {f"data/{k}": v for k, v in totals.items()}
    out["data/skipped_total"] = sum(out[f"data/skipped_{r}"] for r in REASONS)
    slots = out["data/slots"]
    out["data/packing_efficiency"] = out["data/tokens"] / slots if slots else 0.0
    return out


def _counts(batches: list[dict]) -> dict[str, int]:
    """This replica's work in a step, for throughput and MFU."""
    counts = dict.fromkeys(("samples", "images", "tokens", "real_tokens", "loss_tokens",
                            "seg_sq_tokens"), 0)
    for batch in batches:
        counts["samples"] += int(batch["num_samples"])
        counts["images"] += int(batch["num_images"])
        counts["tokens"] += int(batch["input_ids"].numel())
        counts["real_tokens"] += int(batch["num_real_tokens"])
        counts["loss_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())
        counts["seg_sq_tokens"] += _segment_sq_tokens(batch["segment_ids"])
    return counts


def _segment_sq_tokens(segment_ids: torch.Tensor) -> int:
    """Sum over packed samples of length^2 (attention cost of block-diagonal rows)."""
    total = 0
    for row in segment_ids:
        lengths = torch.bincount(row[row > 0])
        total += int((lengths.long() ** 2).sum())
    return total
