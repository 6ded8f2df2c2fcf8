"""The launch checks that need the disk or the machine, before anything is written.

`check_launch(cfg, world_size)` runs after the config validated (`config.validate_launch`,
which runs `check_rerun` before the data-order check of a resume, training/elastic.py)
and before the run lock is taken and `run_dir` is touched. Each check raises `LaunchError`
with one message naming the key and the fix:

* `run_dir` is a file, or cannot be created or written;
* (`check_rerun`) a rerun of a run directory that holds checkpoints, with a model,
  sequence length, image size or trainable groups that its checkpoints cannot resume into
  (or with `resume=never`, which would overwrite them); the run's `config.json` is
  therefore never overwritten by an incompatible launch. Which parallel layouts a
  checkpoint can resume under is the checkpoint's to say (elastic.check_resume);
* the model does not fit: the capacity planner's peak per process for this config and
  layout (`observe/plan.py:required_memory_bytes`) against the memory available to it.

Only the memory check imports torch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenvl_train.checks import LaunchError
from qwenvl_train.config import TrainConfig
from qwenvl_train.training.checkpoint_files import LATEST, checkpoint_dir, step_dirs

# What a checkpoint fixes: a resume with another value cannot load it (or trains a
# different stage under the same name). The parallel layout is checked against the
# checkpoint itself (elastic.check_resume: most layout changes are re-partitioned).
RESUME_KEYS = ("model.llm", "model.vision", "model.adapter", "stage.name", "stage.template",
               "stage.seq_len", "stage.image_size", "stage.trainable", "stage.pack")
MemoryEstimate = Callable[[TrainConfig, int, str], tuple[int, int]]
log = logging.getLogger("qwenvl_train")


def _planned_memory(cfg: TrainConfig, world_size: int, device: str) -> tuple[int, int]:
    # Imported here: the planner imports torch, which the other launch checks do not need.
    from qwenvl_train.training.observe.plan import required_memory_bytes

    return required_memory_bytes(cfg, world_size, device)


def check_launch(cfg: TrainConfig, world_size: int,
                 estimate: MemoryEstimate | None = None) -> None:
    check_run_dir(cfg)  # init_from and the weight sources: config.check_weights
    check_memory(cfg, world_size, estimate or _planned_memory)


def check_run_dir(cfg: TrainConfig) -> None:
    # Normalised first: with ".." after a missing directory the checks below would pass on
    # the lexical path while the OS, creating the missing part, lands on another one.
    run_dir = Path(os.path.abspath(cfg.run_dir))
    if run_dir.exists() and not run_dir.is_dir():
        raise LaunchError(f"run_dir: {run_dir} is a file; pass a directory (created if "
                          "missing), e.g. run_dir=runs/my_stage")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LaunchError(f"run_dir: {run_dir} cannot be created: {existing} is a file; "
                          "pass a directory path")
    for path in (existing, checkpoint_dir(run_dir)):
        if path.exists() and not os.access(path, os.W_OK | os.X_OK):
            raise LaunchError(f"run_dir: {path} is not writable by this user; fix its "
                              "permissions or pass another run_dir")


def check_rerun(cfg: TrainConfig) -> None:
    run_dir = Path(cfg.run_dir)
    root = checkpoint_dir(run_dir)
    tags = step_dirs(root)
    if not tags and not (root / LATEST).exists():
        return
    held = f"{run_dir} holds checkpoints ({', '.join(tags[:3]) or LATEST})"
    if cfg.resume == "never":
        raise LaunchError(f"resume=never: {held}, which a fresh start would overwrite; use "
                          f"a new run_dir, or move {root} away, or resume (resume=auto)")
    saved_file = run_dir / "config.json"
    if not saved_file.is_file():
        return  # nothing to compare with; the checkpoint load itself checks the shapes
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError) as e:
        raise LaunchError(f"run_dir: {saved_file} is unreadable ({e}); restore it, or use a "
                          "new run_dir") from None
    new = cfg.to_dict()
    diff = []
    for key in RESUME_KEYS:
        section, _, name = key.partition(".")
        diff += _differences(saved.get(section, {}), new[section], section, (name,))
    if diff:
        fixes = [f"{k}={_value(a)}" for k, a, _ in diff if not k.startswith("model.")]
        if any(k.startswith("model.") for k, _, _ in diff):
            fixes.insert(0, f"model={saved.get('model', {}).get('name')}")
        raise LaunchError(
            f"{held} trained with {_describe(diff)}. A rerun resumes them and needs the same "
            f"values: rerun with {' '.join(fixes[:4])}, or start a new stage in a new "
            f"run_dir with init_from={run_dir}")


def _differences(saved: dict, new: dict, prefix: str,
                 keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for each leaf that differs under `keys`."""
    out = []
    for key in keys:
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}.{key}", tuple(sorted(a.keys() | b.keys())))
        elif a != b:
            out.append((f"{prefix}.{key}", a, b))
    return out


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict | bool) or v is None else str(v)


def _describe(diff: list[tuple[str, Any, Any]]) -> str:
    shown = "; ".join(f"{k}={_value(a)} (this launch: {_value(b)})" for k, a, b in diff[:4])
    return shown + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")


# -- memory ------------------------------------------------------------------------------
def check_memory(cfg: TrainConfig, world_size: int, estimate: MemoryEstimate) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.lora.enabled:  # the planner counts full training of the groups LoRA adapts
        log.info("launch check: memory not checked (the capacity planner does not model "
                 "model.lora)")
        return
    needed, available = estimate(cfg, world_size, device)
    if needed <= available:
        return
    gib = 2**30
    raise LaunchError(
        f"model={cfg.model.name}: one process needs at least {needed / gib:,.1f} GiB "
        f"(weights, gradients, AdamW state and activations at stage.micro_batch_size="
        f"{cfg.stage.micro_batch_size}, parallel.zero_stage={cfg.parallel.zero_stage} over "
        f"{world_size} process(es); `qwenvl-plan` shows the breakdown) and this {device} has "
        f"{available / gib:,.1f} GiB available per process. Use more devices, parallel=zero3 "
        "(shards weights, gradients and optimizer state), a pipeline/tensor layout "
        "(parallel=pp2|tp2), a smaller micro-batch, or a smaller model")
