"""Data-loader throughput on real photos: our pipeline vs a naive decode, per core.

Builds (in a temp dir) ~200 real-size JPEGs (640x480 crops of the photos bundled with
scikit-image and scikit-learn), then measures, for stage 1 (224 px) and stage 2 (448 px,
packed into 2048-token rows):
  * ours/CPU-s: `build_loader` run in this process (num_workers=0): samples per CPU-second,
    i.e. what one worker process (one core) delivers; CPU time, so other jobs on a shared
    machine do not distort it;
  * ours, 1 worker: wall-clock samples/s through a real DataLoader worker process
    (includes sending batches to the trainer process);
  * naive/CPU-s: in the training process, tar member -> PIL open -> full decode -> RGB ->
    PIL bicubic resize -> float -> CLIP normalise (what a first implementation does).

    OMP_NUM_THREADS=1 python scripts/bench_data.py [--samples 200] [--reps 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from qwenvl_train.data.config import DataConfig, SourceConfig  # noqa: E402
from qwenvl_train.data.images import CLIP_MEAN, CLIP_STD  # noqa: E402
from qwenvl_train.data.loader import build_loader  # noqa: E402
from qwenvl_train.data.shards import ShardWriter  # noqa: E402
from qwenvl_train.data.tokenizer import get_tokenizer  # noqa: E402

W, H = 640, 480


def photos() -> list[tuple[str, Image.Image]]:
    import skimage
    import sklearn

    out = []
    sk = Path(skimage.__file__).parent / "data"
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "retina.jpg", "hubble_deep_field.jpg", "color.png", "camera.png", "coins.png"):
        if (sk / name).exists():
            out.append((name.split(".")[0], Image.open(sk / name).convert("RGB")))
    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    for name in ("china.jpg", "flower.jpg"):
        out.append((name.split(".")[0], Image.open(skl / name).convert("RGB")))
    return out


def real_size_jpeg(img: Image.Image, rng: np.random.Generator) -> bytes:
    """A random crop (>= 60% of each side) resized to 640x480, maybe mirrored."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x, y, x + cw, y + ch)).resize((W, H), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_shards(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    pics = photos()
    im = [{"width": W, "height": H}]
    tasks = ("caption", "vqa", "ref_grounding", "grounded_caption")
    with ShardWriter(root, "bench", max_samples=50) as w:
        for i in range(n):
            name, pic = pics[i % len(pics)]
            task = tasks[i % len(tasks)]
            rec = {"task": task, "source": "bench", "images": im}
            if task == "caption":
                rec["caption"] = f"A photo of the {name}, crop {i}."
            elif task == "vqa":
                rec["qa"] = [{"question": "What is shown in the photo?", "answer": name}]
            elif task == "ref_grounding":
                rec["refs"] = [{"expression": f"the {name}", "boxes": [[10, 20, 600, 470]]}]
            else:
                rec["caption"] = f"The {name} in a photo."
                rec["spans"] = [{"start": 0, "end": 4 + len(name), "boxes": [[5, 5, 320, 240]]}]
            w.write(f"s{i:05d}", rec, [("jpg", real_size_jpeg(pic, rng))])


def bench_ours(root: Path, stage: dict, samples: int, mb: int, workers: int) -> float:
    """samples per CPU-second (workers=0) or per wall-second (workers>0)."""
    clock = time.process_time if workers == 0 else time.perf_counter
    cfg = DataConfig(root=str(root), sources={"bench": SourceConfig("bench-*.tar")},
                     virtual_streams=1)  # one stream: per-worker throughput
    loader = build_loader(cfg, get_tokenizer(), **stage, num_image_tokens=256, dp_rank=0,
                          dp_size=1, micro_batch_size=mb, seed=0, num_workers=workers)
    it = iter(loader)
    first = next(it)  # worker start-up and tokenizer load are not throughput
    seen, t0 = 0, clock()
    while seen < samples:
        seen += next(it)["num_samples"]
    dt = clock() - t0
    assert first["images"].shape[-1] == stage["image_size"]
    return seen / dt


def bench_naive(root: Path, size: int, samples: int) -> float:
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    shards = sorted(root.glob("bench-*.tar"))
    seen, t0 = 0, time.process_time()
    while seen < samples:
        for shard in shards:
            with tarfile.open(shard) as tf:
                for m in tf:
                    if not m.name.endswith(".jpg"):
                        json.loads(tf.extractfile(m).read()) if m.name.endswith("json") else None
                        continue
                    img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                    img = img.resize((size, size), Image.Resampling.BICUBIC)
                    x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
                    torch.from_numpy(x.transpose(2, 0, 1).copy())
                    seen += 1
                    if seen >= samples:
                        return seen / (time.process_time() - t0)
    return seen / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="samples in the shard set")
    ap.add_argument("--reps", type=int, default=2, help="passes over the set per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build_shards(root, args.samples)
        print(f"built {args.samples} JPEGs {W}x{H} in {time.perf_counter() - t:.1f}s")
        n = args.samples * args.reps
        rows = []
        for label, stage, mb in (
            ("stage 1 (224 px)", {"template": "pretrain", "image_size": 224, "seq_len": 512,
                                  "pack": False}, 8),
            ("stage 2 (448 px, packed 2048)", {"template": "multitask", "image_size": 448,
                                               "seq_len": 2048, "pack": True}, 2),
        ):
            naive = bench_naive(root, stage["image_size"], n)
            ours = bench_ours(root, stage, n, mb, workers=0)
            wall = bench_ours(root, stage, n, mb, workers=1)
            rows.append((label, ours, naive, wall))
        print(f"{'samples/s':30s} {'ours/CPU-s':>11s} {'naive/CPU-s':>12s} {'speed-up':>9s} "
              f"{'ours, 1 worker (wall)':>22s}")
        for label, ours, naive, wall in rows:
            print(f"{label:30s} {ours:11.1f} {naive:12.1f} {ours / naive:8.2f}x {wall:22.1f}")


if __name__ == "__main__":
    main()
