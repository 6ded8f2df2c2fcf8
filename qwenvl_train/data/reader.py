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

from .schema import IMAGE_EXTS

_IMAGE_MEMBER = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTS) + r")$")


def expand_shards(root: str | Path, patterns: str) -> list[str]:
    """Shard paths relative to `root` for whitespace-separated brace/glob patterns, sorted."""
    root = Path(root)
    found: set[str] = set()
    for pattern in patterns.split():
        for pat in braceexpand(pattern):
            for p in glob.glob(str(root / pat), recursive=True):
                if p.endswith(".tar") and os.path.isfile(p):
                    found.add(Path(p).relative_to(root).as_posix())
    return sorted(found)


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
