"""Checkpoints that are never half-written and never trusted unverified.

The directory layout and the manifest are in checkpoint_files.py. A save (`save`, every
rank): each rank writes its files -> barrier -> the files are listed, each rank hashes its
share -> rank 0 writes `manifest.json`, moves `latest`, then prunes older checkpoints beyond
`checkpoint.keep_last` (only now: never while the new one is unverified). A crash at any
point leaves `latest` naming the previous complete checkpoint. A failed write (a full disk)
removes the partial step directory, leaves `latest` alone and ends the run with a message
naming the cause and the path.

A resume (`select_resume`, before the model is built) verifies the checkpoint `latest`
names against its manifest (sizes, then checksums; the files split over the ranks). A
damaged checkpoint, or a `latest` that is empty, garbage or names a missing directory, is
never read as "no checkpoint": with `checkpoint.on_damaged=fallback` the newest intact older
checkpoint is used, with a warning naming what was wrong; with `stop` the run refuses with
that message.

Only trainable tensors are saved (with LoRA: its matrices and the fully trained groups);
frozen ones come from the model build on resume (`init_from` / `model.weights` / the seed).
The manifest covers whatever files were written, so it needs no knowledge of that.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_train.checks import RunError
from qwenvl_train.model.source_config import resolve_init_from  # noqa: F401 (torch-free home)
from qwenvl_train.training import relayout
from qwenvl_train.training.checkpoint_files import (
    DATA_STATE,
    LATEST,
    MANIFEST,
    build_manifest,
    checkpoint_dir,
    file_checksum,
    listing,
    read_latest,
    read_manifest,
    shares,
    step_dirs,
    step_of,
    tag_for,
    verify_files,
    write_atomic,
)

__all__ = ["CheckpointError", "checkpoint_dir", "latest_tag", "load", "load_data_state",
           "resolve_init_from", "resume_candidate", "save", "select_resume", "tag_for"]
log = logging.getLogger("qwenvl_train")
TRAINABLE = "trainable"  # names of this rank's trainable parameters, checked on resume
_FULL_BYTES = 64 << 20  # a write that failed with less free space than this: the disk is full
_QUICK_HASH_BYTES = 1 << 20  # `resume_candidate` hashes the files up to this size


class CheckpointError(RunError):
    """A checkpoint that cannot be written or trusted; the message says what to do."""


def agreed(value):
    """Rank 0's value on every rank (rank 0 reads the checkpoint directory for all)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag `latest` names (None without one); raises CheckpointError when unusable."""
    latest = read_latest(checkpoint_dir(run_dir))
    if latest.problem:
        raise CheckpointError(latest.problem)
    return latest.tag


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


# -- save --------------------------------------------------------------------------------
def save(engine, run_dir: str | Path, step: int, trainer_state: dict, rank: int,
         keep_last: int, on_written: Callable[[Path], None] | None = None,
         data_state: dict | None = None, par=None) -> Path:
    """Save on every rank; `latest` moves after every rank wrote and the manifest is written.
    `on_written(path)` runs once this rank's files are in `path`, before the barrier.
    `data_state` (the loader's global state, on rank 0) goes into `data_state.json`. With
    the layout `par` (any ZeRO stage; fp32 without ZeRO), each rank also records its
    `relayout.rank_map`, which lets a resume re-partition the checkpoint for another layout."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():
        # A save of this step that never completed (a crash in it), or the damaged one a
        # resume fell back from: `latest` is not trusted to name it.
        shutil.rmtree(path)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                               exclude_frozen_parameters=True)
        extra = ({relayout.RANK_MAP: relayout.rank_map(engine, par)}
                 if par is not None and relayout.supports(engine) else {})
        torch.save({**trainer_state, "rng": rng_state(), TRAINABLE: _trainable_names(engine),
                    **extra}, path / f"trainer_rank{rank}.pt")
        if rank == 0 and data_state is not None:  # covered by the manifest like the rest
            (path / DATA_STATE).write_text(json.dumps(data_state))
        if on_written is not None:
            on_written(path)
    except Exception as e:
        raise _write_failed(e, root, path) from e
    dist.barrier()  # every rank's files are on disk
    sizes = agreed(listing(path) if rank == 0 else None)
    world = dist.get_world_size()
    mine = {name: file_checksum(path / name) for name in shares(sizes, world)[rank]}
    gathered: list[dict] | None = [{} for _ in range(world)] if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        checksums = {k: v for part in gathered for k, v in part.items()}
        try:
            manifest = build_manifest(tag, world, sizes, checksums)
            write_atomic(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            write_atomic(root / LATEST, tag)  # the commit point
        except OSError as e:
            raise _write_failed(e, root, path) from e
        _prune(root, keep_last, tag)
    dist.barrier()
    return path


def _write_failed(error: BaseException, root: Path, path: Path) -> CheckpointError:
    """Remove the partial save; say why it failed (a full disk, by errno or by the free
    space left: torch's writer reports ENOSPC as an `unexpected pos` RuntimeError)."""
    usage = shutil.disk_usage(root if root.exists() else root.parent)
    shutil.rmtree(path, ignore_errors=True)
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or usage.free < _FULL_BYTES:
        cause = "no space left on device (ENOSPC)"
    else:
        cause = f"{type(error).__name__}: {error}"
    latest = read_latest(root).tag
    where = f"`latest` still names {latest}" if latest else "no earlier checkpoint exists"
    again = f"resume from {latest}" if latest else "start again"
    return CheckpointError(
        f"checkpoint {path} could not be written: {cause}; {usage.free / 2**20:,.0f} MiB "
        f"free of {usage.total / 2**20:,.0f} MiB on its file system. The partial checkpoint "
        f"was removed and {where}. Free space (or lower checkpoint.keep_last, or move "
        f"run_dir), then rerun the same command to {again}.")


def _prune(root: Path, keep_last: int, newest: str) -> None:
    """Keep `newest` and the `keep_last - 1` newest checkpoints older than it. Directories
    newer than `newest` (a damaged one a resume fell back from) stay until overwritten."""
    older = [t for t in step_dirs(root) if step_of(t) < step_of(newest)]
    for tag in older[max(0, keep_last - 1):]:
        shutil.rmtree(root / tag, ignore_errors=True)


# -- resume ------------------------------------------------------------------------------
def select_resume(run_dir: str | Path, on_damaged: str, rank: int) -> str | None:
    """Collective. The verified tag to resume from, or None when `run_dir` has no complete
    checkpoint. Raises CheckpointError when it cannot be trusted (see the module doc)."""
    root = checkpoint_dir(run_dir)
    plan = agreed(_resume_plan(root) if rank == 0 else None)
    if plan is None:
        return None
    problem, candidates = plan
    world = dist.get_world_size()
    if problem:
        if on_damaged == "stop" or not candidates:
            raise CheckpointError(_refusal(root, problem, candidates, on_damaged))
        _warn(rank, f"{problem}; looking for the newest intact checkpoint "
                    "(checkpoint.on_damaged=fallback)")
    damaged = []
    for tag, manifest in candidates:
        problems = _check(root / tag, manifest, rank, world)
        if not problems:
            if damaged:
                _warn(rank, f"resuming from {tag}, the newest intact checkpoint; the steps "
                            "after it are trained again")
            return tag
        what = f"{root / tag} is damaged: {'; '.join(problems[:4])}"
        if on_damaged == "stop":
            raise CheckpointError(
                f"{what}. checkpoint.on_damaged=stop: not resuming. Set "
                "checkpoint.on_damaged=fallback to resume from the newest intact older "
                "checkpoint, or restore the files.")
        _warn(rank, f"{what}; falling back to an older checkpoint")
        damaged.append(tag)
    raise CheckpointError(_refusal(root, problem or f"{', '.join(damaged)} damaged",
                                   [], on_damaged))


def resume_candidate(run_dir: str | Path, on_damaged: str) -> str | None:
    """Without a process group (the launch checks, training/elastic.py): the checkpoint
    `select_resume` will pick, as far as the sizes of all files and the checksums of the
    small ones (data_state.json, the trainer states) tell. A large file corrupted at its
    size is found by `select_resume` only; run.py then checks its pick again. None: no
    checkpoint, or none intact (`select_resume` says so)."""
    root = checkpoint_dir(run_dir)
    plan = _resume_plan(root)
    if plan is None or (plan[0] and on_damaged == "stop"):
        return None
    for tag, manifest in plan[1]:
        if manifest is None:  # written before manifests: nothing to check it against
            return tag
        if isinstance(manifest, dict) and not verify_files(
                root / tag, manifest, list(manifest["files"]), hash_at_most=_QUICK_HASH_BYTES):
            return tag
        if on_damaged == "stop":
            return None
    return None


def _resume_plan(root: Path) -> tuple[str | None, list] | None:
    """Rank 0: (what is wrong with `latest` or None, [(tag, manifest)] to try in order)."""
    latest = read_latest(root)
    tags = step_dirs(root)
    manifests = {t: read_manifest(root / t) for t in tags}
    with_manifest = [(t, manifests[t]) for t in tags if manifests[t] is not None]
    if latest.tag:
        older = [(t, m) for t, m in with_manifest if step_of(t) < step_of(latest.tag)]
        return None, [(latest.tag, manifests[latest.tag]), *older]
    if latest.problem:
        return latest.problem, with_manifest
    if with_manifest:  # written completely, but `latest` was removed
        return f"{root / LATEST} is missing", with_manifest
    return None  # no save ever completed: a fresh start (torn step dirs are overwritten)


def _check(step_dir: Path, manifest: dict | str | None, rank: int, world: int) -> list[str]:
    """Collective: what is wrong with one checkpoint (each rank verifies its share)."""
    if isinstance(manifest, str):
        return [manifest]
    if manifest is None:  # written before manifests existed: check what can be checked
        missing = [f"trainer_rank{r}.pt" for r in range(world)
                   if not (step_dir / f"trainer_rank{r}.pt").is_file()]
        if not missing:
            _warn(rank, f"{step_dir} has no {MANIFEST} (written by an older version): "
                        "loading it unverified")
        return [f"{name} is missing (no {MANIFEST} either)" for name in missing]
    # Written by another number of processes: whether that layout can resume is the launch
    # check's (training/elastic.py); the files are verified the same way.
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    mine = verify_files(step_dir, manifest, shares(sizes, world)[rank])
    everyone: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    return [p for part in everyone for p in part]


def _refusal(root: Path, problem: str, candidates: list, on_damaged: str) -> str:
    intact = [t for t, m in candidates if isinstance(m, dict)]
    if intact:
        fix = (f"write the tag to resume from into it (e.g. `echo {intact[0]} > "
               f"{root / LATEST}`), or set checkpoint.on_damaged=fallback to resume from "
               "the newest intact checkpoint")
    else:
        fix = (f"no intact checkpoint is left; to train from the start, use a new run_dir "
               f"(or move {root} away)")
    policy = f" (checkpoint.on_damaged={on_damaged})" if intact else ""
    return f"cannot resume from {root}: {problem}{policy}. Nothing was loaded; {fix}."


def _warn(rank: int, message: str) -> None:
    if rank == 0:
        log.warning("checkpoint: %s", message)


def load(engine, run_dir: str | Path, tag: str, rank: int, par=None,
         layout: dict | None = None) -> dict:
    """Restore model, optimizer and scheduler; return this rank's trainer state. `layout`
    (elastic.layout_of) is this run's; a checkpoint of another layout (allowed at launch by
    elastic.check_resume) is re-partitioned by relayout.load when DeepSpeed cannot reload
    it (another pipeline or tensor size or ZeRO stage; another dp size under ZeRO)."""
    root = checkpoint_dir(run_dir)
    data_state = root / tag / DATA_STATE  # absent when no loader saved (test workers)
    saved = (json.loads(data_state.read_text()).get("layout", {})
             if data_state.exists() else {})
    same_layout = not saved or layout is None or all(
        saved.get(k) == layout[k] for k in relayout.LAYOUT_KEYS)
    # Another layout: the counters are the same on every rank, take rank 0's; the per-rank
    # RNG streams have no counterpart, each rank keeps its seeded one.
    path = root / tag / f"trainer_rank{rank if same_layout else 0}.pt"
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has; "
            "resume with the same number of processes or start a new stage with init_from"
        )
    state = torch.load(path, weights_only=False)
    state.pop(relayout.RANK_MAP, None)
    trainable = state.pop(TRAINABLE, None)
    try:
        if relayout.needed(saved, layout):
            relayout.load(engine, par, root / tag)
        else:
            _check_trainable(trainable, engine, root / tag)
            _deepspeed_load(engine, root, tag)
    except (relayout.RelayoutError, ValueError) as e:
        raise CheckpointError(f"{e}; resume with the saving run's config, or start a new "
                              "run_dir with init_from") from e
    rng = state.pop("rng")
    if same_layout:
        set_rng_state(rng)
    elif rank == 0:
        log.warning("resuming a checkpoint of layout %s under %s: RNG states not restored",
                    relayout.describe(saved), relayout.describe(layout))
    return state


def _deepspeed_load(engine, root: Path, tag: str) -> None:
    try:  # not strict: frozen tensors are not in the checkpoint (see `save`)
        load_path, _ = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=False,
        )
    except Exception as e:
        raise CheckpointError(
            f"{root / tag} is intact but does not load into this run ({type(e).__name__}: "
            f"{str(e)[:300]}); resume with the model and parallel layout it was written "
            "with, or start a new stage from its export with init_from") from e
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")


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
            f"also has {extra[:4]}")


def load_data_state(run_dir: str | Path, tag: str) -> dict:
    """The data position of every virtual stream (`data_state.json` of checkpoint `tag`)."""
    path = checkpoint_dir(run_dir) / tag / DATA_STATE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint predates the layout-independent data order "
            "(or is incomplete); resume it with the code that wrote it, or start the stage "
            "in a new run_dir")
    return json.loads(path.read_text())
