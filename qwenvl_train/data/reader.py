"""Shard lists and tolerant, seekable tar reading.

A shard is indexed once (tar headers only; member data is skipped by seeking) into entries
`key -> {ext: (offset, size)}`. Samples are then read by seeking, which is what makes
in-shard shuffling and cheap exact resume possible: a resumed loader jumps straight to
its position without reading the members before it. Local (or mounted) files only.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from qwenvl_train.checks import ConfigError

from .config import DataConfig
from .schema import IMAGE_EXTS

_IMAGE_MEMBER = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTS) + r")$")


def expand_shards(root: str | Path, patterns: str) -> list[str]:
    """Shard paths for whitespace-separated brace/glob patterns, sorted: relative to `root`
    for relative patterns, absolute for absolute ones (`~` is the home folder)."""
    root = Path(root)
    found: set[str] = set()
    for pattern in patterns.split():
        for pat in braceexpand(os.path.expanduser(pattern)):
            absolute = os.path.isabs(pat)
            for p in glob.glob(pat if absolute else str(root / pat), recursive=True):
                if p.endswith(".tar") and os.path.isfile(p):
                    found.add(Path(p).as_posix() if absolute
                              else Path(p).relative_to(root).as_posix())
    return sorted(found)


def expand_sources(cfg: DataConfig) -> list[tuple[str, list[str], float]]:
    """(name, shard paths, weight) of every source of `cfg` (`DataConfig.all_sources`).
    A source that matches no shard is an error; one ConfigError names every such source
    with its pattern, and where relative patterns start (`data.root`)."""
    out, missing = [], []
    for name, (key, src) in cfg.all_sources().items():
        shards = expand_shards(cfg.root, src.shards)
        if shards:
            out.append((name, shards, float(src.weight)))
        else:
            missing.append((key, src.shards))
    if not missing:
        return out
    root = Path(cfg.root)
    exists = root.is_dir()
    absolute = [os.path.isabs(os.path.expanduser(p))
                for _, patterns in missing for p in patterns.split()]
    all_relative, all_absolute = not any(absolute), all(absolute)
    if not out and all_relative and not (exists and any(root.rglob("*.tar"))):
        where = "holds no shards (*.tar)" if exists else "does not exist"
        demo = f"build the demo set with `qwenvl-data demo --out {root}`, or " \
            if cfg.name == "demo" else ""
        raise ConfigError(
            f"data.root: {str(root)!r} {where}; {demo}convert your data with `qwenvl-data "
            "convert` (data_recipes/README.md) and point data.root (or QWENVL_DATA) at it")
    lines = [f"  {key}: {pattern!r}" for key, pattern in missing]
    where = "" if all_absolute else (f" (relative patterns start at data.root={str(root)!r}"
                                     f"{'' if exists else ', which does not exist'})")
    raise ConfigError(
        f"data: {len(missing)} of {len(missing) + len(out)} data source(s) match no .tar "
        f"file{where}:\n" + "\n".join(lines)
        + "\nFix the path, drop a source you do not have (~data.sources.NAME), or train on "
        "just your shards: data=shards data.shards='[/path/a/*.tar,/path/b/*.tar:0.5]'")


@dataclass
class Entry:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)

    def image_members(self) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for ext, loc in self.members.items():
            m = _IMAGE_MEMBER.match(ext)
            if m:
                out.setdefault(int(m.group(1)), loc)
        return out


@dataclass
class ShardIndex:
    path: str
    entries: list[Entry]
    error: str | None = None  # truncated / corrupt tar: entries before the damage are kept


def index_tar(path: str | Path) -> ShardIndex:
    entries: dict[str, Entry] = {}
    error = None
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    error = f"member {m.name} cut off at byte {size} (truncated tar)"
                    break
                dirname, _, fname = m.name.rpartition("/")
                key, dot, ext = fname.partition(".")
                if not dot or not key:
                    continue  # not a webdataset member (no extension)
                key = f"{dirname}/{key}" if dirname else key
                entries.setdefault(key, Entry(key)).members.setdefault(ext.lower(),
                                                                       (m.offset_data, m.size))
            end = tf.offset
        if error is None:
            # tarfile stops silently at a damaged header mid-file; a clean end is EOF or
            # a zero block.
            with open(path, "rb") as f:
                f.seek(end)
                block = f.read(512)
            if block and (len(block) < 512 or block.strip(b"\0")):
                error = f"damaged tar header at byte {end}"
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"tar read error: {e}"
    return ShardIndex(str(path), list(entries.values()), error)


class ShardFile:
    """An open shard; `read(offset, size)` returns one member's bytes."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, loc: tuple[int, int]) -> bytes:
        self._f.seek(loc[0])
        data = self._f.read(loc[1])
        if len(data) != loc[1]:
            raise OSError(f"{self.path}: short read at {loc[0]}")
        return data

    def close(self) -> None:
        self._f.close()
