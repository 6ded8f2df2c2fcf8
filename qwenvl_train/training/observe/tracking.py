"""Experiment tracking (W&B), console progress, throughput and MFU.

Only rank 0 tracks; every other rank gets a tracker whose methods do nothing, so the
trainer calls them unconditionally. W&B is a convenience, never a dependency of training:
any exception from it is caught, reported once, and the run carries on console-only.
"""

from __future__ import annotations

import os
import resource
import secrets
import string
import sys
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from qwenvl_train.config import TrainConfig
from qwenvl_train.training.observe import flops
from qwenvl_train.training.observe.config import TrackingConfig
from qwenvl_train.training.observe.progress import Progress

RUN_ID_FILE = "wandb_run_id.txt"
STEP_KEY = "train/step"
COUNT_KEYS = ("samples", "images", "tokens", "real_tokens")


def _read_or_create_run_id(run_dir: Path) -> str:
    """The W&B id of this run_dir; rerunning the same run_dir resumes the same W&B run."""
    path = run_dir / RUN_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)  # written before init: a crash during init still resumes this id
    return run_id


class Tracker:
    """`log` / `summary` / `close`; create with `Tracker.create(...)`."""

    def __init__(self, progress: Progress | None = None, run: Any = None) -> None:
        self.progress, self.run = progress, run
        self._warned = False
        self._first_step = 0  # W&B already holds the steps below this one

    @classmethod
    def create(
        cls,
        tracking_cfg: TrackingConfig,
        run_dir: str | os.PathLike,
        resolved_config: dict,
        rank: int,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        log_every: int = 1,
        stream: IO[str] | None = None,
    ) -> Tracker:
        """`tracking_cfg` comes validated with the train config (TrackingConfig.validate)."""
        if rank != 0:
            return cls()
        tracker = cls(Progress(total_steps, start_step=start_step, log_every=log_every,
                               stream=stream))
        if tracking_cfg.backend == "wandb" and tracking_cfg.mode != "disabled":
            tracker._init_wandb(tracking_cfg, Path(run_dir), resolved_config)
        return tracker

    def _init_wandb(self, cfg: TrackingConfig, run_dir: Path, config: dict) -> None:
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                tags=list(cfg.tags),
                config=config,
                allow_val_change=True,  # a resumed run may change e.g. log_every
                dir=str(run_dir),  # files land in run_dir/wandb
                id=_read_or_create_run_id(run_dir),
                resume="allow",
                mode=cfg.mode,
                settings=wandb.Settings(init_timeout=cfg.init_timeout),
            )
            # W&B's step is the training step (`log` passes it), so a resumed run's steps
            # continue where its checkpoint was, and `train/step` is the charts' x axis.
            # Online, a resumed run starts at W&B's next step (`starting_step`): steps it
            # already has (logged after the checkpoint, before the kill) are not sent again;
            # exact resume makes their values the same. Offline, W&B cannot resume (it has
            # no server to ask; `resume` is ignored and `starting_step` is 0): each launch
            # writes its own offline-run-*-<id> folder under the same id, and
            # `wandb sync run_dir/wandb/offline-run-*` uploads them into one run in order.
            self._first_step = int(getattr(self.run, "starting_step", 0) or 0)
            self.run.define_metric(STEP_KEY)
            self.run.define_metric("*", step_metric=STEP_KEY)
        except Exception as exc:  # tracking must never stop training
            self._disable(f"W&B init failed ({type(exc).__name__}: {exc})")

    def _disable(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            msg = f"[tracking] {why}; continuing with console logging only"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self.write(msg)
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(step, metrics)
        if self.run is not None and step >= self._first_step:
            try:
                self.run.log({STEP_KEY: step, **metrics}, step=step)
            except Exception as exc:
                self._disable(f"W&B log failed ({type(exc).__name__}: {exc})")

    def log_wandb(self, step: int, values: Mapping[str, Any]) -> None:
        """To W&B only, no console progress line (evaluation results, tables)."""
        if self.run is not None:
            try:
                self.run.log({STEP_KEY: step, **values})
            except Exception as exc:
                self._disable(f"W&B log failed ({type(exc).__name__}: {exc})")

    def summary(self, values: Mapping[str, Any]) -> None:
        """Run-level facts (parameter counts, FLOPs per step, final metrics)."""
        if self.progress is not None and self.run is None:
            self.write("[summary] " + ", ".join(f"{k}={v}" for k, v in values.items()))
        if self.run is not None:
            try:
                self.run.summary.update(dict(values))
            except Exception as exc:
                self._disable(f"W&B summary failed ({type(exc).__name__}: {exc})")

    def write(self, message: str) -> None:
        """A console message on rank 0 that does not break the progress bar."""
        if self.progress is not None:
            self.progress.write(message)

    def close(self, exit_code: int = 0) -> None:
        if self.progress is not None:
            self.progress.close()
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                print(f"[tracking] W&B finish failed: {exc}", file=sys.stderr)


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak accelerator memory on CUDA, else this process's resident memory (GiB)."""
    gib = float(1 << 30)
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return {
            "mem/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem/max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        }
    stats: dict[str, float] = {}
    try:  # VmRSS: now, VmHWM: peak (kB)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key = "mem/rss_gib" if line.startswith("VmRSS") else "mem/max_rss_gib"
                stats[key] = int(line.split()[1]) * 1024 / gib
    except OSError:
        pass
    if "mem/max_rss_gib" not in stats:  # ru_maxrss is KiB on Linux, bytes on macOS
        unit = 1 if sys.platform == "darwin" else 1024
        stats["mem/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / gib
    return stats


class ThroughputMeter:
    """Rates over a sliding window of optimizer steps, MFU and memory.

    `update(counts, step_time)` takes this replica's counts of the step (`samples`,
    `images`, `tokens` = computed LLM positions incl. pads, `real_tokens`; optional
    `loss_tokens` and `seg_sq_tokens` = sum of l^2 over packed samples) and multiplies them
    by `dp_size` for global rates (pass dp_size=1 if they are already summed over ranks).
    MFU = global step FLOPs / (time * world_size * peak): model-parallel ranks (tp, pp)
    share one replica's work, so every device counts in the denominator."""

    def __init__(
        self,
        *,
        dp_size: int = 1,
        world_size: int | None = None,
        peak_flops: float | None = None,
        flops_fn: Callable[[Mapping[str, int]], float] | None = None,
        device: torch.device | str | None = None,
        window: int = 20,
    ) -> None:
        self.dp_size, self.world_size = dp_size, world_size or dp_size
        self.peak_flops, self.flops_fn, self.device = peak_flops, flops_fn, device
        self._win: deque[tuple[float, dict[str, float]]] = deque(maxlen=window)
        self.totals = dict.fromkeys(COUNT_KEYS, 0)

    @classmethod
    def create(cls, cfg: TrainConfig, *, dp_size: int, device: torch.device | str | None = None,
               window: int = 20) -> ThroughputMeter:
        """From the full train config: FLOPs of the stage, peak of this device and dtype."""
        stage, model = cfg.stage, cfg.model
        world = dp_size * cfg.parallel.pp * cfg.parallel.tp
        name = device
        if isinstance(device, torch.device) or str(device).startswith("cuda"):
            dev = torch.device(device)
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        peak = flops.peak_flops(name, stage.precision, cfg.tracking.peak_tflops)

        adapted = model.lora.parts  # LoRA targets: no base-weight gradients there

        def flops_fn(c: Mapping[str, int]) -> float:
            seg = c.get("seg_sq_tokens")
            return flops.step_flops(
                model, stage.image_size, c["tokens"], c["images"], stage.seq_len,
                stage.trainable, loss_tokens=c.get("loss_tokens"), adapted=adapted,
                segment_len=seg / c["real_tokens"] if seg and c.get("real_tokens") else None,
            )

        return cls(dp_size=dp_size, world_size=world, peak_flops=peak, flops_fn=flops_fn,
                   device=device, window=window)

    def update(
        self, counts: Mapping[str, int], step_time: float, *, flops: float | None = None
    ) -> dict[str, float]:
        c = {k: float(counts.get(k, 0)) for k in COUNT_KEYS}
        if "real_tokens" not in counts:
            c["real_tokens"] = c["tokens"]
        if flops is None and self.flops_fn is not None:
            flops = self.flops_fn(counts)
        c["flops"] = float(flops or 0.0)
        self._win.append((step_time, c))
        for k in COUNT_KEYS:
            self.totals[k] += int(c[k]) * self.dp_size
        t = sum(x[0] for x in self._win)
        g = {k: sum(x[1][k] for x in self._win) * self.dp_size for k in c}  # global sums
        out: dict[str, float] = {"perf/step_time_s": step_time}
        if t > 0:
            out.update({
                "perf/samples_per_s": g["samples"] / t,
                "perf/images_per_s": g["images"] / t,
                "perf/tokens_per_s": g["tokens"] / t,
                "perf/real_tokens_per_s": g["real_tokens"] / t,
                "perf/tokens_per_s_per_device": g["tokens"] / t / self.world_size,
            })
            if g["flops"] > 0:
                achieved = g["flops"] / t / self.world_size
                out["perf/tflops_per_device"] = achieved / 1e12
                if self.peak_flops:
                    out["perf/mfu"] = achieved / self.peak_flops
        if g["tokens"] > 0:
            out["perf/padding_frac"] = 1.0 - g["real_tokens"] / g["tokens"]
        out.update({f"perf/total_{k}": float(v) for k, v in self.totals.items()})
        out.update(memory_stats(self.device))
        return out

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.totals.update({k: int(v) for k, v in state.items() if k in self.totals})
