"""Shared by the benchmark scripts: a demo-data run config in a temp dir, and RSS readings."""

from __future__ import annotations

import tempfile
from pathlib import Path


def demo_config(defaults: list[str], overrides: list[str], prefix: str):
    """The typed config of a tiny demo run in a new temp dir (run_dir, and the small demo
    data set built there unless `overrides` names a `data.root`)."""
    from qwenvl_train.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    if not any(o.startswith("data.root=") for o in overrides):
        from data_recipes.demo import build_demo

        build_demo(tmp / "data", small=True)
    return load_config(["model=tiny", "data=demo", "scale=demo", "tracking=none",
                        f"data.root={tmp / 'data'}", f"run_dir={tmp / 'run'}", *defaults,
                        *overrides])


def rss_kib(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
