"""The offline demo set: every task, built only from files that ship in installed packages.

`build_demo(out_dir, small=False)` writes `{task}-{i:05d}.tar` (+ `{task}-manifest.json`
from the shard writer, + `manifest.json` with counts) into `out_dir`, and a held-out split
for evaluation into `out_dir/val/` (`{task}-00000.tar` for caption, vqa, ref_grounding and
chat; `data=demo`'s patterns do not reach into it): new crops of the photos with all their
captions as references, easy-vqa's test split, new scenes and new dialogues. Same bytes on
every build: fixed seeds, fixed JPEG/PNG settings, tar headers with mtime 0 (the shard
writer's). The files are first written to a temporary folder and then moved in, so an
interrupted build never leaves a half set that looks complete.
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
# The held-out split (val/): samples per task, one shard each.
VAL = {"caption": 21, "vqa": 32, "ref_grounding": 24, "chat": 24}
VAL_SMALL = {"caption": 8, "vqa": 8, "ref_grounding": 8, "chat": 8}
VAL_DIR = "val"


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


# Held-out generators: other seeds (2000 + i; training uses 1000 + i), other images.
VAL_GENERATORS: dict[str, Callable[[int, int], list[Converted]]] = {
    "caption": lambda n, seed: photos.caption_samples(n, seed, held_out=True),
    "vqa": lambda n, seed: vqa.vqa_samples(n, seed, split="test"),
    "ref_grounding": _scene_task(scenes.ref_grounding_sample, "val_ref"),
    "chat": lambda n, seed: [Converted(f"val_{c.key}", c.record, c.images)
                             for c in chat.chat_samples(n, seed)],
}


def _write_task(task: str, samples: list[Converted], out: Path,
                shards: int = SHARDS_PER_TASK) -> dict[str, Any]:
    from qwenvl_train.data.shards import ShardWriter

    per_shard = max(1, math.ceil(len(samples) / shards))
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
        val = {}
        for seed, (task, n) in enumerate((VAL_SMALL if small else VAL).items()):
            m = _write_task(task, VAL_GENERATORS[task](n, 2000 + seed), tmp / VAL_DIR, 1)
            val[task] = {"num_samples": m["num_samples"],
                         "shards": [f"{VAL_DIR}/{s['name']}" for s in m["shards"]]}
        for task in counts:  # a previous build (full vs small) may have left more shards
            for old in out.glob(f"{task}-*.tar"):
                old.unlink()
        shutil.rmtree(out / VAL_DIR, ignore_errors=True)
        names = sorted(os.listdir(tmp))
        for name in sorted(names, key=lambda n: n.endswith(".json")):  # tars first
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {"demo": "small" if small else "full",
                "num_samples": sum(t["num_samples"] for t in tasks.values()), "tasks": tasks,
                "val": val}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)  # not in the file
    return manifest


__all__ = ["build_demo", "FULL", "SMALL", "VAL", "VAL_SMALL"]
