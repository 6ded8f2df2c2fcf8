"""Read webdataset-style tars (img2dataset output) and tabular files, one sample at a time."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from data_recipes.jsonstream import iter_records


def expand_sources(src: str, exts: tuple[str, ...]) -> list[str]:
    """A file, a directory (its files with one of `exts`, sorted) or a glob pattern."""
    if os.path.isdir(src):
        return sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith(exts))
    if any(c in src for c in "*?["):
        return sorted(glob.glob(src))
    return [src]


class BrokenTar:
    """Yielded in place of the rest of a tar that cannot be read on (truncated/corrupt)."""

    def __init__(self, path: str, error: str):
        self.path, self.error = path, error


def iter_tar_samples(path: str) -> Iterator[dict[str, Any] | BrokenTar]:
    """Group consecutive members by key (the name up to its first dot, directory kept):
    {"__key__": key, "jpg": bytes, "txt": bytes, ...}. Streams: one sample in memory."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = os.path.join(d, stem)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                f = tf.extractfile(m)
                sample.setdefault("__key__", key)
                sample[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        # The sample being read when the tar broke may lack members: drop it.
        sample = {}
        yield BrokenTar(path, str(e))
    if sample:
        yield sample


def iter_table(path: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file (read in record batches) or of a JSON / JSON-lines file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names] if columns else None
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            yield from batch.to_pylist()
    else:
        yield from iter_records(path)


def read_samples(out_dir: str, pattern: str = "*.tar") -> dict[str, tuple[dict, list[bytes]]]:
    """key -> (record, [image bytes in index order]) of every shard matching `pattern`:
    a small reader for tests and spot checks (the training loader lives in qwenvl_train)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(out_dir, pattern))):
        for s in iter_tar_samples(path):
            if isinstance(s, BrokenTar):
                raise ValueError(f"{path}: {s.error}")
            images = sorted((k for k in s if k[:1].isdigit()), key=lambda k: int(k.split(".")[0]))
            out[s["__key__"]] = (json.loads(s["json"]), [s[k] for k in images])
    return out
