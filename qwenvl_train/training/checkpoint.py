"""Checkpoints that are never half-written, and the weights that flow between stages.

Layout of `run_dir/checkpoints/`:
  step_000100/            DeepSpeed's model + optimizer (+ scheduler) files for every rank,
                          `trainer_rank{r}.pt` (step, counters, RNG) per rank, and
                          `data_state.json` (rank 0): every virtual stream's position and
                          the layout that wrote it (data/loader.py, training/elastic.py)
  latest                  the tag of the newest COMPLETE checkpoint; moved last, atomically
A crash during a save leaves `latest` pointing at the previous complete checkpoint.
Only trainable tensors are saved (with LoRA: its matrices and the fully trained groups);
frozen ones come from the model build on resume (`init_from` / `model.weights` / the seed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_train.model.source_config import resolve_init_from  # noqa: F401 (torch-free home)

LATEST = "latest"
TRAINABLE = "trainable"  # names of this rank's trainable parameters, checked on resume
DATA_STATE = "data_state.json"
log = logging.getLogger("qwenvl_train")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def latest_tag(run_dir: str | Path) -> str | None:
    path = checkpoint_dir(run_dir) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} names {tag!r}, which does not exist")
    return tag


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, step: int, trainer_state: dict, rank: int,
         keep_last: int, on_written: Callable[[Path], None] | None = None,
         data_state: dict | None = None) -> Path:
    """Save on every rank; move `latest` only after every rank finished writing.
    `on_written(path)` runs once this rank's files are in `path`, before `latest` moves.
    `data_state` (the loader's global state, on rank 0) goes into `data_state.json`."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    torch.save({**trainer_state, "rng": rng_state(), TRAINABLE: _trainable_names(engine)},
               root / tag / f"trainer_rank{rank}.pt")
    if rank == 0 and data_state is not None:
        (root / tag / DATA_STATE).write_text(json.dumps(data_state))
    if on_written is not None:
        on_written(root / tag)
    dist.barrier()
    if rank == 0:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)  # atomic on POSIX
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for old in tags[: max(0, len(tags) - keep_last)]:
        if old != keep:
            shutil.rmtree(root / old, ignore_errors=True)


def load(engine, run_dir: str | Path, tag: str, rank: int) -> dict:
    """Restore model, optimizer and scheduler through DeepSpeed; return this rank's state."""
    root = checkpoint_dir(run_dir)
    # Written by another number of processes (an elastic resume, checked at launch by
    # training/elastic.py): the counters are the same on every rank, take rank 0's; the
    # per-rank RNG streams have no counterpart, each rank keeps its seeded one.
    data_state = root / tag / DATA_STATE  # absent when no loader saved (test workers)
    saved_world = (json.loads(data_state.read_text()).get("layout", {}).get("world_size")
                   if data_state.exists() else None)
    same_layout = saved_world in (None, dist.get_world_size())
    path = root / tag / f"trainer_rank{rank if same_layout else 0}.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has; "
            "resume with the same number of processes or start a new stage with init_from"
        )
    state = torch.load(path, weights_only=False)
    _check_trainable(state.pop(TRAINABLE, None), engine, root / tag)
    # Not strict: frozen tensors are not in the checkpoint (see `save`).
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
        load_module_strict=False,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng = state.pop("rng")
    if same_layout:
        set_rng_state(rng)
    elif rank == 0:
        log.warning("resuming a checkpoint of %d processes with %d: RNG states not restored",
                    saved_world, dist.get_world_size())
    return state


def _trainable_names(engine) -> list[str]:
    return [n for n, p in engine.module.named_parameters() if p.requires_grad]


def _check_trainable(saved: list[str] | None, engine, where: Path) -> None:
    """The checkpoint holds exactly the tensors this run trains (or the resume is refused)."""
    if saved is None:  # written before the names were recorded
        return
    mine = _trainable_names(engine)
    if set(saved) != set(mine):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        raise ValueError(
            f"{where} was saved training other tensors than this run trains (stage.trainable "
            f"or model.lora changed?): this run also trains {missing[:4]}, the checkpoint "
            f"also has {extra[:4]}; resume with the saving run's config, or start a new "
            "run_dir with init_from")


def load_data_state(run_dir: str | Path, tag: str) -> dict:
    """The data position of every virtual stream (`data_state.json` of checkpoint `tag`)."""
    path = checkpoint_dir(run_dir) / tag / DATA_STATE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint predates the layout-independent data order "
            "(or is incomplete); resume it with the code that wrote it, or start the stage "
            "in a new run_dir")
    return json.loads(path.read_text())

