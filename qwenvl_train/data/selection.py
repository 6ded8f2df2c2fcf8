"""Step 1 of loader.py: which shards each source reads for a stage's template, and the
launch check that every virtual stream will find samples. Torch-free: the CLI runs it
before anything heavy is imported."""

from __future__ import annotations

import logging
import os

from qwenvl_train.checks import ConfigError

from .config import DataConfig
from .reader import expand_sources
from .shards import read_manifests
from .templates import ACCEPTS

log = logging.getLogger(__name__)


def resolve_sources(cfg: DataConfig, template: str, *, quiet: bool = False
                    ) -> list[tuple[str, list[str], float]]:
    """Step 1: expand patterns (a source that matches nothing is an error naming it, as
    the launch check `config.validate_launch` reports it); drop shards (and sources) the
    template cannot use."""
    return _usable_sources(cfg, template, quiet)[0]


def _usable_sources(cfg: DataConfig, template: str, quiet: bool
                    ) -> tuple[list[tuple[str, list[str], float]], dict[str, dict]]:
    """resolve_sources, and the manifest entries of the shards it read them from."""
    sources = expand_sources(cfg)
    folders = {os.path.dirname(s) for _, shards, _ in sources for s in shards}
    manifests = read_manifests(cfg.root, folders) if cfg.use_manifests else {}
    out = []
    for name, shards, weight in sources:
        usable = [s for s in shards if s not in manifests
                  or set(manifests[s].get("tasks", {})) & ACCEPTS[template]]
        if usable:
            out.append((name, usable, weight))
        elif not quiet:
            log.info("data: source %s has no %s-template tasks; not used", name, template)
    if not out:
        raise ConfigError(f"data.sources: no source has samples that the {template!r} "
                          f"template takes (tasks {sorted(ACCEPTS[template])})")
    return out, manifests


def check_source_sizes(cfg: DataConfig, template: str) -> None:
    """Launch check: a source with fewer shards than virtual streams is split by sample
    (sources.py), so each of the V streams needs one sample of its own; a source whose
    manifests count fewer usable samples than V would stop the run at its first epoch."""
    sources, manifests = _usable_sources(cfg, template, quiet=True)  # the loader logs drops
    small = []
    for name, shards, _ in sources:
        if len(shards) >= cfg.virtual_streams or any(s not in manifests for s in shards):
            continue  # shard mode, or a count the manifests cannot give
        usable = sum(n for s in shards for task, n in manifests[s].get("tasks", {}).items()
                     if task in ACCEPTS[template])
        if usable < cfg.virtual_streams:
            small.append((name, usable))
    if small:
        low = min(n for _, n in small)
        names = ", ".join(f"{name!r} ({n})" for name, n in small)
        raise ConfigError(
            f"data.virtual_streams={cfg.virtual_streams}: source(s) {names} hold fewer "
            f"samples the {template!r} template takes than virtual streams, so some streams "
            f"would read nothing; set data.virtual_streams to at most {low} (a multiple of "
            "dp x data.num_workers), or add data")
