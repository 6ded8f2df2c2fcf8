"""Cost per image of the converters' image check (`data_recipes.common.image_from_bytes`) on
a 640x480 JPEG, against the header-only `verify()` it replaced and a full-size decode.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/bench_image_check.py

Two images: a real photo (scikit-image's astronaut, resized; quality 90) and a noisy one
(gradients + 30% noise; quality 90) whose entropy-coded data is ~3x larger, the worst case
of the check. Prints the median of 5 rounds of 200 checks, in CPU milliseconds per image (process
time: steadier than wall time on a shared machine).
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from data_recipes.common import image_from_bytes

SIZE = (640, 480)


def photo() -> bytes:
    from skimage import data

    im = Image.fromarray(data.astronaut()).resize(SIZE, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def noisy() -> bytes:
    w, h = SIZE
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3))
    arr = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 180 + noise * 0.3
    buf = io.BytesIO()
    Image.fromarray(arr.astype("uint8")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def verify_only(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as im:
        im.load()


def ms_per_image(check: Callable[[bytes], object], data: bytes, n: int = 200) -> float:
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            check(data)
        rounds.append((time.process_time() - start) / n * 1000)
    return statistics.median(rounds)


def main() -> None:
    checks = {"verify() (old, reads no JPEG data)": verify_only,
              "image_from_bytes (draft 1/8 + load)": image_from_bytes,
              "full-size decode (load)": full_decode}
    for name, data in (("photo", photo()), ("noisy", noisy())):
        print(f"{name} 640x480 JPEG, {len(data) / 1024:.0f} KiB")
        for label, check in checks.items():
            print(f"  {label:38s} {ms_per_image(check, data):6.2f} CPU ms/image")


if __name__ == "__main__":
    main()
