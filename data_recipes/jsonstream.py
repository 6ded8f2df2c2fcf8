"""Stream the elements of a big JSON array (or the members of a big JSON object) from disk.

Annotation files of public data sets are single JSON documents of hundreds of MB
(VQAv2, GQA, COCO). `json.load` would hold all of it in memory; this reader holds
one element at a time plus a read buffer. Each element is decoded by the C-accelerated
`json` decoder (`raw_decode`); when an element runs past the buffer, more is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_WS = " \t\n\r"
_CHUNK = 1 << 20
_NUM_CONT = "0123456789.eE+-"


class _Reader:
    def __init__(self, path: str | Path, chunk: int = _CHUNK):
        self._f = open(path, encoding="utf-8")  # noqa: SIM115 -- closed by close()
        self._chunk = chunk
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._dec = json.JSONDecoder()

    def close(self) -> None:
        self._f.close()

    def _fill(self) -> bool:
        """Append a chunk to the buffer (dropping what was consumed); False at EOF."""
        if self.eof:
            return False
        data = self._f.read(self._chunk)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """Next non-whitespace character ('' at EOF), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, ch: str) -> None:
        got = self.peek()
        if got != ch:
            raise ValueError(f"expected {ch!r} at offset {self.pos}, got {got!r}")
        self.pos += 1

    def value(self) -> Any:
        """Decode one JSON value at the cursor, reading more input as needed."""
        self.peek()
        while True:
            try:
                obj, end = self._dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._fill():
                    raise
                continue
            # A number at the buffer's end may be cut ("12" of "1234", "1" of "1.5"):
            # read on until a character that cannot continue it follows.
            if isinstance(obj, int | float) and not isinstance(obj, bool) and (
                    end == len(self.buf) or self.buf[end] in _NUM_CONT):
                if self._fill():
                    continue
            self.pos = end
            return obj

    def items(self, close: str) -> Iterator[None]:
        """Yield once per element of the array/object just opened, positioned at it."""
        if self.peek() == close:
            self.pos += 1
            return
        while True:
            yield
            sep = self.peek()
            self.pos += 1
            if sep == close:
                return
            if sep != ",":
                raise ValueError(f"expected ',' or {close!r}, got {sep!r}")

    def skip(self) -> None:
        """Skip one value; big arrays/objects are walked element by element."""
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            for _ in self.items("]"):
                self.skip()
        elif ch == "{":
            self.pos += 1
            for _ in self.items("}"):
                self.value()
                self.expect(":")
                self.skip()
        else:
            self.value()


def _seek_key(r: _Reader, key: str | None) -> None:
    if key is None:
        return
    r.expect("{")
    for _ in r.items("}"):
        k = r.value()
        r.expect(":")
        if k == key:
            return
        r.skip()
    raise KeyError(f"top-level key {key!r} not found")


def iter_array(path: str | Path, key: str | None = None) -> Iterator[Any]:
    """Elements of the top-level array, or of the array under top-level `key`."""
    r = _Reader(path)
    try:
        _seek_key(r, key)
        r.expect("[")
        for _ in r.items("]"):
            yield r.value()
    finally:
        r.close()


def iter_object(path: str | Path, key: str | None = None) -> Iterator[tuple[str, Any]]:
    """(name, value) members of the top-level object, or of the object under `key`."""
    r = _Reader(path)
    try:
        _seek_key(r, key)
        r.expect("{")
        for _ in r.items("}"):
            k = r.value()
            r.expect(":")
            yield k, r.value()
    finally:
        r.close()


def top_level_scalars(path: str | Path) -> dict[str, Any]:
    """Top-level members that are not arrays/objects (e.g. VQAv2 `data_subtype`)."""
    out: dict[str, Any] = {}
    r = _Reader(path)
    try:
        r.expect("{")
        for _ in r.items("}"):
            k = r.value()
            r.expect(":")
            if r.peek() in "[{":
                r.skip()
            else:
                out[k] = r.value()
    finally:
        r.close()
    return out


def iter_records(path: str | Path) -> Iterator[Any]:
    """Records of a JSON array file, a JSON-lines file (also .gz), or a top-level object."""
    p = str(path)
    if p.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from iter_jsonl(p)
        return
    r = _Reader(p)
    try:
        first = r.peek()
    finally:
        r.close()
    if first == "[":
        yield from iter_array(p)
    else:
        yield from (v for _, v in iter_object(p))


def iter_jsonl(path: str | Path) -> Iterator[Any]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)
