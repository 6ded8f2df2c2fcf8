"""Write webdataset shards in our record format, deterministically, with a manifest.

One sample = `KEY.json` + `KEY.{i}.{ext}` per image. Tar headers carry fixed metadata
(mtime 0, uid/gid 0) so the same input gives the same bytes. The manifest records counts
per task and source for every shard; the loader uses it to skip shards a stage template
cannot use without opening them.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from .records import parse_record
from .schema import IMAGE_EXTS, SampleError


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _check_image(i: int, ext: str, data: bytes, size: tuple[int, int], key: str) -> None:
    """Header-only check: the member opens as an image of the declared size."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            actual = im.size
    except Exception as e:  # PIL raises many types for garbage input
        raise SampleError("bad_image", f"{key}: image {i} ({ext}) does not open: {e}") from None
    if actual != tuple(size):
        raise SampleError("bad_image", f"{key}: image {i} is {actual}, record declares {size}")


class ShardWriter:
    """Context manager writing `{prefix}-{index:05d}.tar` shards into `out_dir`.

    A new shard starts when the current one holds `max_samples` samples or the next
    sample would push it past `max_bytes`.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_samples: int = 1000,
                 max_bytes: int = 256 << 20, check_images: bool = True):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.check_images = check_images
        self._tar: tarfile.TarFile | None = None
        self._shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self.manifest: dict[str, Any] = {}

    # -- context manager
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing
    def write(self, key: str, record: dict, images: list[tuple[str, bytes]]) -> None:
        """Validate `record` (+ its encoded images) and append it to the current shard."""
        sample = parse_record(record, key, image_indices=set(range(len(images))))
        if len(images) != len(sample.image_sizes):
            raise SampleError("bad_record", f"{key}: {len(images)} image members for "
                              f"{len(sample.image_sizes)} declared images")
        if key in self._keys:
            raise SampleError("bad_record", f"duplicate key {key!r}")
        members = [(f"{key}.json", json.dumps(record, ensure_ascii=False,
                                              sort_keys=True).encode())]
        for i, (ext, data) in enumerate(images):
            ext = ext.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                raise SampleError("bad_record", f"{key}: image extension {ext!r} not in "
                                  f"{IMAGE_EXTS}")
            if self.check_images:
                _check_image(i, ext, data, sample.image_sizes[i], key)
            members.append((f"{key}.{i}.{ext}", data))
        size = sum(512 + -(-len(d) // 512) * 512 for _, d in members)
        cur = self._shards[-1] if self._shards else None
        if (self._tar is None or cur["samples"] >= self.max_samples
                or (cur["samples"] and cur["bytes"] + size > self.max_bytes)):
            self._open_next()
            cur = self._shards[-1]
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._keys.add(key)
        cur["samples"] += 1
        cur["bytes"] += size
        cur["tasks"][sample.task] += 1
        cur["sources"][sample.source] += 1

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        name = f"{self.prefix}-{len(self._shards):05d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.GNU_FORMAT)
        self._shards.append({"name": name, "samples": 0, "bytes": 0,
                             "tasks": Counter(), "sources": Counter()})

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write `{prefix}-manifest.json`; returns the manifest."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        tasks: Counter = Counter()
        sources: Counter = Counter()
        shards = []
        for s in self._shards:
            tasks.update(s["tasks"])
            sources.update(s["sources"])
            shards.append({**s, "tasks": dict(sorted(s["tasks"].items())),
                           "sources": dict(sorted(s["sources"].items()))})
        self.manifest = {
            "prefix": self.prefix,
            "num_samples": sum(s["samples"] for s in shards),
            "tasks": dict(sorted(tasks.items())),
            "sources": dict(sorted(sources.items())),
            "shards": shards,
        }
        path = self.out_dir / f"{self.prefix}-manifest.json"
        path.write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")
        return self.manifest


def read_manifests(root: str | Path, folders: Iterable[str] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Shard entries of `*-manifest.json` files by shard path as `reader.expand_shards`
    writes it (relative to `root`, or absolute): of every manifest under `root`, or only of
    those directly in `folders` (relative to `root` or absolute; a manifest sits beside its
    shards, so the folders of the shards in use are enough)."""
    root = Path(root)
    if folders is None:
        found = [(m, m.parent.relative_to(root).as_posix())
                 for m in sorted(root.rglob("*-manifest.json"))]
    else:
        found = [(m, folder) for folder in sorted(set(folders))
                 for m in sorted((root / folder).glob("*-manifest.json"))]
    out: dict[str, dict[str, Any]] = {}
    for mpath, folder in found:
        try:
            for s in json.loads(mpath.read_text()).get("shards", []):
                name = s["name"] if folder in ("", ".") else posixpath.join(folder, s["name"])
                out[name] = s
        except (ValueError, KeyError, TypeError, OSError):
            continue  # a broken manifest only costs the optimisation
    return out
