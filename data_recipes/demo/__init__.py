"""The offline demo set: every task, built only from files that ship in installed packages.

`build_demo(out_dir, small=False)` writes `{task}-{i:05d}.tar` (+ `{task}-manifest.json`
from the shard writer, + `manifest.json` with counts) into `out_dir`. Same bytes on every
build: fixed seeds, fixed JPEG/PNG settings, tar headers with mtime 0 (the shard writer's).
The files are first written to a temporary folder and then moved in, so an interrupted
build never leaves a half set that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_recipes.common import Converted
from data_recipes.demo import chat, documents, photos, scenes, vqa
from data_recipes.demo.assets import require_demo_packages

# Samples per task. Full: enough for a falling loss over ~30-60 steps of a tiny model.
FULL = {"caption": 315, "vqa": 300, "grounding": 240, "ref_grounding": 300,
        "grounded_caption": 300, "ocr": 240, "text": 120, "chat": 240}
SMALL = {"caption": 42, "vqa": 24, "grounding": 16, "ref_grounding": 24,
         "grounded_caption": 24, "ocr": 18, "text": 8, "chat": 24}
SHARDS_PER_TASK = 4  # so that 2 ranks x 2 loader workers each get a shard of every task


def _scene_task(make: Callable[[str, Any], Converted], prefix: str) -> Callable:
    def build(n: int, seed: int) -> list[Converted]:
        rng = random.Random(seed)
        return [make(f"{prefix}_{i:05d}", rng) for i in range(n)]

    return build


GENERATORS: dict[str, Callable[[int, int], list[Converted]]] = {
    "caption": photos.caption_samples,
    "vqa": vqa.vqa_samples,
    "grounding": _scene_task(scenes.grounding_sample, "grd"),
    "ref_grounding": _scene_task(scenes.ref_grounding_sample, "ref"),
    "grounded_caption": _scene_task(scenes.grounded_caption_sample, "gcap"),
    "ocr": documents.ocr_samples,
    "text": documents.text_samples,
    "chat": chat.chat_samples,
}


def _write_task(task: str, samples: list[Converted], out: Path) -> dict[str, Any]:
    from qwenvl_train.data.shards import ShardWriter

    per_shard = max(1, math.ceil(len(samples) / SHARDS_PER_TASK))
    with ShardWriter(out, prefix=task, max_samples=per_shard) as w:
        for s in samples:
            w.write(s.key, s.record, s.images)
    return w.manifest


def build_demo(out_dir: str | Path, small: bool = False) -> dict[str, Any]:
    """Write the demo shards into `out_dir`; returns the manifest (also `manifest.json`).
    Without the packages of the `demo` extra: a ModuleNotFoundError that names them."""
    require_demo_packages()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = SMALL if small else FULL
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=out))
    try:
        tasks = {}
        for seed, (task, n) in enumerate(counts.items()):
            m = _write_task(task, GENERATORS[task](n, 1000 + seed), tmp)
            tasks[task] = {"num_samples": m["num_samples"], "sources": m["sources"],
                           "shards": [s["name"] for s in m["shards"]]}
        for task in counts:  # a previous build (full vs small) may have left more shards
            for old in out.glob(f"{task}-*.tar"):
                old.unlink()
        names = sorted(os.listdir(tmp))
        for name in sorted(names, key=lambda n: n.endswith(".json")):  # tars first
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"demo": "small" if small else "full",
                "num_samples": sum(t["num_samples"] for t in tasks.values()), "tasks": tasks}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)  # not in the file
    return manifest


__all__ = ["build_demo", "FULL", "SMALL"]
