"""Pieces every converter shares: the converted-sample tuple, skip reasons, image loading."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_recipes.jsonstream import iter_records

# Formats the shard reader takes as they are; anything else is re-encoded to PNG.
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class Skip(Exception):  # noqa: N818 -- a control-flow signal, not an error
    """Raised by a converter for a source item that does not become a sample.

    `reason` is a short snake_case word; the manifest counts skipped items by it.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Converted:
    """One output sample: shard key, record JSON (docs/contracts.md) and image members.

    `notes`: (reason, detail) of problems with the source item that did not stop it from
    becoming a sample (e.g. unreadable metadata); the runner reports them by key."""

    key: str
    record: dict[str, Any]
    images: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LoadedImage:
    ext: str
    data: bytes
    width: int
    height: int


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def clean_key(key: Any) -> str:
    """Shard keys may not contain dots (webdataset splits members at the first dot)."""
    return _KEY_BAD.sub("_", str(key)) or "_"


def _decode_check(im: Image.Image) -> None:
    """Decode the whole image; a truncated or corrupt file raises. `verify()` would not do:
    for JPEG it reads no entropy-coded data at all. A JPEG is decoded at 1/8 scale (the
    DCT-domain `draft`), which still reads every coded block but skips most of the inverse
    DCT and colour conversion (measured by scripts/bench_image_check.py)."""
    if im.format == "JPEG":
        im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def image_from_bytes(data: bytes, name: str = "") -> LoadedImage:
    """Check that the bytes decode as an image, read its size, keep its encoding when we can."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            width, height = im.size
            if fmt in _KEEP_FORMATS:
                _decode_check(im)
                return LoadedImage(_KEEP_FORMATS[fmt], data, width, height)
            # GIF/BMP/TIFF...: decode the first frame and store it as PNG.
            im.seek(0)
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise Skip("bad_image", f"{name}: {e}") from e
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return LoadedImage("png", buf.getvalue(), width, height)


def load_image(path: str | Path) -> LoadedImage:
    """Read an image file from disk; a missing or broken file is a Skip."""
    path = str(path)
    if path.startswith(("http://", "https://")):
        raise Skip("remote_image", path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise Skip("missing_image", path) from e
    except OSError as e:
        raise Skip("bad_image", f"{path}: {e}") from e
    return image_from_bytes(data, path)


def image_dir(root: str, default_from: str | None = None) -> str:
    """`root` when it is a folder. Otherwise a FileNotFoundError before anything is converted,
    naming the folder (and, for a default, what it was derived from) and `--image-root`."""
    if os.path.isdir(root):
        return root
    why = f" (the default for {default_from})" if default_from else ""
    raise FileNotFoundError(f"image folder {root}{why} does not exist; pass --image-root DIR")


def records_with_root(files: list[str],
                      image_root: str | None) -> Iterator[tuple[int, str, Any]]:
    """(position, image folder, record) over the records of JSON / JSON-lines `files`; the
    image folder is `image_root`, else the folder of the record's file."""
    index = 0
    for path in files:
        root = image_root or os.path.dirname(os.path.abspath(path))
        for rec in iter_records(path):
            yield index, root, rec
            index += 1


def resolve(root: str | None, rel: str) -> str:
    """A source's image path, relative to the image root unless absolute or a URL."""
    if rel.startswith(("http://", "https://")) or os.path.isabs(rel) or not root:
        return rel
    return os.path.join(root, rel)


def xywh_to_xyxy(b: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in b)
    return [x, y, x + w, y + h]


def clip_box(b: list[float], width: int, height: int) -> list[float] | None:
    """Clip a pixel box to the image; None when nothing of it is left."""
    x1, y1, x2, y2 = (float(v) for v in b)
    x1, x2 = max(0.0, min(x1, x2)), min(float(width), max(x1, x2))
    y1, y2 = max(0.0, min(y1, y2)), min(float(height), max(y1, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]


def row_image(row: dict[str, Any], image_root: str | None, field: str = "image") -> LoadedImage:
    """The image of a table row: bytes in `field` ({"bytes": ...} as `datasets` stores
    images, or raw), a path in `field` / `file_name`, or `key` -> `{image_root}/{key}.jpg`."""
    img = row.get(field)
    name = str(row.get("key") or row.get("file_name") or "")
    if isinstance(img, dict) and img.get("bytes"):
        return image_from_bytes(img["bytes"], name)
    if isinstance(img, dict) and img.get("path"):
        img = img["path"]
    if isinstance(img, bytes | bytearray):
        return image_from_bytes(bytes(img), name)
    path = img if isinstance(img, str) else row.get("file_name")
    if path is None and row.get("key") is not None:
        path = f"{row['key']}.jpg"
    if path is None:
        raise Skip("no_image")
    return load_image(resolve(image_root, str(path)))
