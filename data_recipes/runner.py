"""Run a converter: stream source items in units, convert units in parallel, resume.

A *unit* is a deterministic slice of the source (a block of items, or one input file).
Unit `i` writes its own shards `{prefix}-{i:05d}-{j:05d}.tar`, then a completion marker
`.{prefix}-progress/unit-{i:05d}.json` holding its counts. A rerun after an interruption
skips every unit with a marker and redoes the others from scratch (their partial tars are
deleted first), so the result is the same as an uninterrupted run. The final
`{prefix}-manifest.json` sums the markers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any

from data_recipes.common import Converted, Skip

log = logging.getLogger(__name__)


class Converter:
    """Base class of a converter. Subclasses set `name`, `task` and implement
    `items()` (cheap, streaming, deterministic order) and `convert(item)`.
    File-unit converters override `units()` and `iter_unit()` instead of `items()`.
    Instances are pickled to the worker processes: keep only plain options on them."""

    name = "base"
    task = "caption"
    block_size = 1000  # items per unit when units are blocks (run_conversion sets it)
    option_choices: dict[str, tuple[str, ...]] = {}  # allowed values of options, for the CLI

    def items(self) -> Iterator[Any]:
        raise NotImplementedError

    def units(self) -> Iterator[Any]:
        it = iter(self.items())
        while block := list(islice(it, self.block_size)):
            yield block

    def iter_unit(self, unit: Any) -> Iterable[Any]:
        return unit

    def convert(self, item: Any) -> Converted | list[Converted]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """What a resumed run must agree on (the source and every option)."""
        return {k: v for k, v in sorted(vars(self).items())
                if not k.startswith("_") and k != "block_size"}


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _run_unit(
    conv: Converter, index: int, unit: Any, out_dir: str, prefix: str, max_samples: int,
    max_bytes: int, progress: str,
) -> dict[str, Any]:
    from qwenvl_train.data.shards import ShardWriter

    out = Path(out_dir)
    unit_prefix = f"{prefix}-{index:05d}"
    for stale in out.glob(f"{unit_prefix}-*.tar"):  # partial output of an interrupted run
        stale.unlink()
    skipped: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    seen = 0
    w = ShardWriter(out, prefix=unit_prefix, max_samples=max_samples, max_bytes=max_bytes)
    with w:
        for item in conv.iter_unit(unit):
            seen += 1
            try:
                result = conv.convert(item)
            except Skip as s:
                skipped[s.reason] += 1
                continue
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                # A source record of an unexpected shape: count it, log the first few.
                skipped["malformed_item"] += 1
                if skipped["malformed_item"] <= 3:
                    log.warning("%s unit %d: malformed item (%r): %.200r", conv.name, index,
                                e, item)
                continue
            for c in result if isinstance(result, list) else [result]:
                try:
                    w.write(c.key, c.record, c.images)
                except (ValueError, TypeError) as e:  # record failed validation
                    skipped[getattr(e, "reason", "invalid_record")] += 1
                    log.warning("%s unit %d key %s: %s", conv.name, index, c.key, e)
                    continue
                tasks[c.record["task"]] += 1
                sources[c.record["source"]] += 1
    # The writer's per-unit manifest moves into the marker (and from there into the merged
    # `{prefix}-manifest.json`, whose shard entries the loader reads).
    shards = w.manifest.get("shards", [])
    (out / f"{unit_prefix}-manifest.json").unlink(missing_ok=True)
    summary = {
        "unit": index, "items": seen, "samples": sum(tasks.values()), "tasks": dict(tasks),
        "sources": dict(sources), "skipped": dict(skipped), "shards": shards,
    }
    _atomic_json(Path(progress) / f"unit-{index:05d}.json", summary)
    return summary


def run_conversion(
    conv: Converter, out_dir: str | Path, *, prefix: str | None = None, workers: int = 1,
    max_samples: int = 1000, max_bytes: int = 256 << 20,
) -> dict[str, Any]:
    """Convert `conv`'s source into shards under `out_dir`; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or conv.name
    conv.block_size = max_samples  # a unit of items then fills about one shard
    progress = out / f".{prefix}-progress"
    progress.mkdir(exist_ok=True)
    settings = {"recipe": conv.name, "options": conv.options(), "max_samples": max_samples,
                "max_bytes": max_bytes, "block_size": conv.block_size}
    settings = json.loads(json.dumps(settings, default=str))
    cfg_path = progress / "settings.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != settings:
            raise ValueError(
                f"{out} holds a conversion with other settings ({cfg_path}); "
                f"use a new --out or delete {progress} and the {prefix}-*.tar shards")
    else:
        _atomic_json(cfg_path, settings)

    summaries: dict[int, dict[str, Any]] = {}
    args = (str(out), prefix, max_samples, max_bytes, str(progress))

    def done(index: int, s: dict[str, Any]) -> None:
        summaries[index] = s
        log.info("%s: unit %d done (%d samples, skipped %s)", prefix, index, s["samples"],
                 s["skipped"] or "none")

    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    pending: dict[Future, int] = {}
    try:
        for index, unit in enumerate(conv.units()):
            marker = progress / f"unit-{index:05d}.json"
            if marker.exists():
                summaries[index] = json.loads(marker.read_text())
                continue
            if pool is None:
                done(index, _run_unit(conv, index, unit, *args))
                continue
            # Bounded in-flight work: the source is never all read into memory.
            while len(pending) >= 2 * workers:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(pending.pop(f), f.result())
            pending[pool.submit(_run_unit, conv, index, unit, *args)] = index
        for f in list(pending):
            done(pending.pop(f), f.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    manifest = _merge(prefix, settings, [summaries[i] for i in sorted(summaries)])
    _atomic_json(out / f"{prefix}-manifest.json", manifest)
    return manifest


def _merge(prefix: str, settings: dict, units: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Counter[str]] = {"tasks": Counter(), "sources": Counter(),
                                       "skipped": Counter()}
    for u in units:
        for k, c in total.items():
            c.update(u[k])
    return {
        "prefix": prefix, **settings, "units": len(units),
        "items": sum(u["items"] for u in units),
        "num_samples": sum(u["samples"] for u in units),
        "tasks": dict(total["tasks"]), "sources": dict(total["sources"]),
        "skipped": dict(total["skipped"]),
        "shards": [s for u in units for s in u["shards"]],
    }
