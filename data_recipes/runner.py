"""Run a converter: stream source items in units, convert units in parallel, resume.

A *unit* is a deterministic slice of the source (a block of items, or one input file).
Unit `i` writes its own shards `{prefix}-{i:05d}-{j:05d}.tar`, the items it skipped or kept
with a problem (key, reason, detail) and then a completion marker
`.{prefix}-progress/unit-{i:05d}.json` holding its counts and the size and mtime of the
input files it was made from. A rerun skips every unit whose marker matches its inputs and
redoes the others from scratch (their partial tars are deleted first), so the result is
the same as an uninterrupted run: after an interruption the unfinished units are redone,
after an input file changed the units made from it are. Units the source no longer has
(it shrank) lose their shards. The final `{prefix}-manifest.json` sums the markers;
`{prefix}-problems.jsonl` lists every skipped or flagged item by key.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any

from data_recipes.common import Converted, Skip
from data_recipes.wds import expand_sources

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
    source_exts: tuple[str, ...] = ()  # file kinds `src` may name as a folder or glob
    src = ""

    def source_files(self) -> list[str]:
        """The files `src` names: a file, a folder's files of `source_exts`, or a glob."""
        return expand_sources(self.src, self.source_exts)

    def inputs(self) -> list[str]:
        """Every annotation/data file the conversion reads (image files aside): a change to
        one of them redoes the units made from it."""
        return self.source_files()

    def unit_inputs(self, unit: Any) -> list[str]:
        """The inputs unit `unit` is made from. Blocks of items depend on every input (item
        positions shift when any earlier file changes); file units override this."""
        return self.inputs()

    def item_key(self, item: Any) -> str | None:
        """The name of a source item in reports (its sample key or source id), if known."""
        return None

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


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_text(path, json.dumps(obj, indent=1, sort_keys=True))


def fingerprint(paths: list[str]) -> dict[str, list[int]]:
    """path -> [size, mtime_ns]: what a marker records of its inputs. A missing input is a
    FileNotFoundError naming it, before anything is converted."""
    out = {}
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"input file {p} does not exist") from None
        out[p] = [st.st_size, st.st_mtime_ns]
    return out


class _Problems:
    """The items of one unit that were skipped or kept with a problem: counted by reason,
    listed by key, the first few of each reason logged."""

    LOGGED_PER_REASON = 3

    def __init__(self, name: str, index: int):
        self.name, self.index = name, index
        self.skipped: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        self.lines: list[str] = []

    def add(self, key: str, reason: str, detail: str, kept: bool) -> None:
        counter = self.kept if kept else self.skipped
        counter[reason] += 1
        self.lines.append(json.dumps({"key": key, "reason": reason, "detail": detail[:300],
                                      "kept": kept}, ensure_ascii=False) + "\n")
        if counter[reason] <= self.LOGGED_PER_REASON:
            log.warning("%s unit %d: %s %s (%s%s)", self.name, self.index,
                        "kept" if kept else "skipped", key, reason,
                        f": {detail[:200]}" if detail else "")


def _key_of(conv: Converter, item: Any, index: int, position: int) -> str:
    try:
        key = conv.item_key(item)
    except Exception:  # a malformed item may not even yield its key
        key = None
    return key or f"unit{index:05d}_item{position:06d}"


def _run_unit(
    conv: Converter, index: int, unit: Any, inputs: dict[str, list[int]], out_dir: str,
    prefix: str, max_samples: int, max_bytes: int, progress: str,
) -> dict[str, Any]:
    from qwenvl_train.data.shards import ShardWriter

    out = Path(out_dir)
    unit_prefix = f"{prefix}-{index:05d}"
    for stale in out.glob(f"{unit_prefix}-*.tar"):  # partial output of an interrupted run
        stale.unlink()
    problems = _Problems(conv.name, index)
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
                problems.add(_key_of(conv, item, index, seen - 1), s.reason, s.detail, False)
                continue
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                # A source record of an unexpected shape: count it and name it.
                problems.add(_key_of(conv, item, index, seen - 1), "malformed_item",
                             f"{e!r}: {str(item)[:200]}", False)
                continue
            for c in result if isinstance(result, list) else [result]:
                try:
                    w.write(c.key, c.record, c.images)
                except (ValueError, TypeError) as e:  # record failed validation
                    problems.add(c.key, getattr(e, "reason", "invalid_record"), str(e), False)
                    continue
                for reason, detail in c.notes:
                    problems.add(c.key, reason, detail, True)
                tasks[c.record["task"]] += 1
                sources[c.record["source"]] += 1
    # The writer's per-unit manifest moves into the marker (and from there into the merged
    # `{prefix}-manifest.json`, whose shard entries the loader reads).
    shards = w.manifest.get("shards", [])
    (out / f"{unit_prefix}-manifest.json").unlink(missing_ok=True)
    summary = {
        "unit": index, "items": seen, "samples": sum(tasks.values()), "tasks": dict(tasks),
        "sources": dict(sources), "skipped": dict(problems.skipped),
        "kept_with_problems": dict(problems.kept), "shards": shards, "inputs": inputs,
    }
    _atomic_text(Path(progress) / f"unit-{index:05d}-problems.jsonl", "".join(problems.lines))
    _atomic_json(Path(progress) / f"unit-{index:05d}.json", summary)  # the unit is done
    return summary


def _changed(old: dict[str, list[int]], new: dict[str, list[int]]) -> list[str]:
    return sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))


def _drop_units_from(out: Path, prefix: str, progress: Path, first: int) -> None:
    """Remove the shards, markers and problem lists of units `first`, `first + 1`, ...: the
    source had them on an earlier run (or an interrupted one started them) and has no more."""
    shard = re.compile(re.escape(prefix) + r"-(\d{5})-\d{5}\.tar")
    unit_file = re.compile(r"unit-(\d{5})(?:\.json|-problems\.jsonl)")
    dropped = set()
    for folder, pattern in ((out, shard), (progress, unit_file)):
        for path in sorted(folder.iterdir()):
            m = pattern.fullmatch(path.name)
            if m and int(m.group(1)) >= first:
                dropped.add(int(m.group(1)))
                path.unlink()
    if dropped:
        log.info("%s: units %s are no longer in the source; removed their shards", prefix,
                 sorted(dropped))


def run_conversion(
    conv: Converter, out_dir: str | Path, *, prefix: str | None = None, workers: int = 1,
    max_samples: int = 1000, max_bytes: int = 256 << 20,
) -> dict[str, Any]:
    """Convert `conv`'s source into shards under `out_dir`; returns the manifest."""
    current = fingerprint(conv.inputs())  # missing inputs fail here, before anything is written
    if not current:
        raise FileNotFoundError(f"--src {conv.src}: no input files "
                                f"(a file, a folder of {'/'.join(conv.source_exts)} or a glob)")
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
    count = 0
    try:
        for index, unit in enumerate(conv.units()):
            count = index + 1
            inputs = {p: current.get(p) or fingerprint([p])[p] for p in conv.unit_inputs(unit)}
            marker = progress / f"unit-{index:05d}.json"
            if marker.exists():
                old = json.loads(marker.read_text())
                if old.get("inputs") == inputs:
                    summaries[index] = old
                    continue
                log.info("%s: unit %d: input changed since it was converted (%s); "
                         "converting it again", prefix, index,
                         ", ".join(_changed(old.get("inputs") or {}, inputs)))
                marker.unlink()
            if pool is None:
                done(index, _run_unit(conv, index, unit, inputs, *args))
                continue
            # Bounded in-flight work: the source is never all read into memory.
            while len(pending) >= 2 * workers:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(pending.pop(f), f.result())
            pending[pool.submit(_run_unit, conv, index, unit, inputs, *args)] = index
        for f in list(pending):
            done(pending.pop(f), f.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _drop_units_from(out, prefix, progress, count)

    problems = _merge_problems(out, prefix, progress, sorted(summaries))
    manifest = _merge(prefix, settings, [summaries[i] for i in sorted(summaries)], problems)
    _atomic_json(out / f"{prefix}-manifest.json", manifest)
    if manifest["skipped"] or manifest["kept_with_problems"]:
        log.info("%s: skipped %s, kept with problems %s; every key and reason: %s", prefix,
                 manifest["skipped"] or "none", manifest["kept_with_problems"] or "none",
                 out / manifest["problems_file"])
    return manifest


EXAMPLES_PER_REASON = 5


def _merge_problems(out: Path, prefix: str, progress: Path,
                    units: list[int]) -> dict[str, list[str]]:
    """Concatenate the units' problem lists into `{prefix}-problems.jsonl`; returns the
    first few keys of every reason (for the manifest)."""
    examples: dict[str, list[str]] = {}
    text = []
    for i in units:
        path = progress / f"unit-{i:05d}-problems.jsonl"
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        text += lines
        for line in lines:
            p = json.loads(line)
            keys = examples.setdefault(p["reason"], [])
            if len(keys) < EXAMPLES_PER_REASON:
                keys.append(p["key"])
    _atomic_text(out / f"{prefix}-problems.jsonl", "".join(text))
    return examples


def _merge(prefix: str, settings: dict, units: list[dict[str, Any]],
           problem_examples: dict[str, list[str]]) -> dict[str, Any]:
    total: dict[str, Counter[str]] = {"tasks": Counter(), "sources": Counter(),
                                       "skipped": Counter(), "kept_with_problems": Counter()}
    for u in units:
        for k, c in total.items():
            c.update(u.get(k, {}))
    return {
        "prefix": prefix, **settings, "units": len(units),
        "items": sum(u["items"] for u in units),
        "num_samples": sum(u["samples"] for u in units),
        "tasks": dict(total["tasks"]), "sources": dict(total["sources"]),
        "skipped": dict(total["skipped"]),
        "kept_with_problems": dict(total["kept_with_problems"]),
        "problems_file": f"{prefix}-problems.jsonl", "problem_examples": problem_examples,
        "shards": [s for u in units for s in u["shards"]],
    }
