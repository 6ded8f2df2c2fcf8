"""Data-loader throughput on real photos: our pipeline against three baselines and the
fastest decode+resize kernel available here, per CPU-second, all in one run.

Builds (in a temp dir) 200 real-size JPEGs per stage (640x480 crops of the photos bundled
with scikit-image and scikit-learn; stage 1: caption pairs, stage 2: a mixture of four
tasks), then measures, for stage 1 (224 px) and stage 2 (448 px, packed into 2048-token
rows), samples per CPU-second of this process (CPU time, so other
jobs on a shared machine do not distort it; one process = what one loader worker does):
  * ours: `build_loader` (num_workers=0): tar -> record -> template + tokenise -> JPEG
    decoded at reduced DCT scale (simplejpeg, else PIL draft) -> torch uint8 bicubic ->
    pack -> collate, batches uint8 (the model normalises on the device);
  * before: the same loader as it was before issue 11: PIL draft decode and float,
    CLIP-normalised batches (the normalisation done in collate);
  * naive: tar member -> PIL open -> full decode -> RGB -> PIL bicubic resize -> float ->
    CLIP normalise (what a first implementation does);
  * open_clip-style: a webdataset pipeline as open_clip's `data.py` builds it (tar ->
    `decode("pilrgb")` (full decode) -> (jpg, json) -> torchvision-free transform: PIL
    bicubic resize, to float, CLIP normalise; caption tokenised -> `batched`);
  * kernels: decode + resize only (bytes in memory -> uint8 [3, S, S]), several ways;
    the best of them bounds what any pipeline can do.
Also ours through one real DataLoader worker process, wall-clock samples/s (includes
sending batches to the trainer process).

    OMP_NUM_THREADS=1 python scripts/bench_data.py [--samples 200] [--rounds 3]
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
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from qwenvl_train.data import images as image_ops  # noqa: E402
from qwenvl_train.data import stream as stream_mod  # noqa: E402
from qwenvl_train.data.config import DataConfig, SourceConfig  # noqa: E402
from qwenvl_train.data.images import CLIP_MEAN, CLIP_STD  # noqa: E402
from qwenvl_train.data.loader import build_loader  # noqa: E402
from qwenvl_train.data.shards import ShardWriter  # noqa: E402
from qwenvl_train.data.tokenizer import get_tokenizer  # noqa: E402
from qwenvl_train.model.vision import normalize_images  # noqa: E402

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


def build_shards(root: Path, n: int, tasks: tuple[str, ...]) -> None:
    """`n` samples, one 640x480 JPEG each, cycling through `tasks`."""
    rng = np.random.default_rng(0)
    pics = photos()
    im = [{"width": W, "height": H}]
    root.mkdir(parents=True, exist_ok=True)
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


def record_text(rec: dict) -> str:
    """The free text of a bench record (what open_clip's pipeline tokenises)."""
    parts = [rec.get("caption", "")]
    parts += [f"{qa['question']} {qa['answer']}" for qa in rec.get("qa", [])]
    parts += [r["expression"] for r in rec.get("refs", [])]
    return " ".join(p for p in parts if p)


def bench_openclip(root: Path, size: int, samples: int, mb: int) -> float:
    """open_clip's webdataset pipeline shape, torchvision-free (samples per CPU-second)."""
    import webdataset as wds

    tok = get_tokenizer()
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def transform(img: Image.Image) -> torch.Tensor:  # Resize((S, S)), ToTensor, Normalize
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return (x - mean) / std

    def tokens(rec: dict) -> torch.Tensor:
        ids = tok.encode(record_text(rec))[:77]
        return torch.tensor(ids + [tok.pad_id] * (77 - len(ids)))

    urls = [str(p) for p in sorted(root.glob("bench-*.tar"))]
    pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
                .decode("pilrgb").to_tuple("0.jpg", "json").map_tuple(transform, tokens)
                .batched(mb))
    seen, t0 = 0, time.process_time()
    while seen < samples:
        for images, _ in pipeline:
            seen += images.shape[0]
            if seen >= samples:
                break
    return seen / (time.process_time() - t0)


def bench_before(root: Path, stage: dict, samples: int, mb: int) -> float:
    """Our loader as before issue 11: PIL draft decode, float normalised batches."""
    collate = stream_mod.collate

    def float_collate(*args, **kwargs) -> dict:
        batch = collate(*args, **kwargs)
        batch["images"] = normalize_images(batch["images"], torch.float32)
        return batch

    saved_jpeg = image_ops.simplejpeg
    image_ops.simplejpeg, stream_mod.collate = None, float_collate
    try:
        return bench_ours(root, stage, samples, mb, workers=0)
    finally:
        image_ops.simplejpeg, stream_mod.collate = saved_jpeg, collate


# ---- decode + resize kernels: encoded bytes -> uint8 [3, S, S] --------------------------
def _torch_resize(arr: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                         align_corners=False)[0]


def _pil_draft(data: bytes, size: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    return img.convert("RGB")


def _simplejpeg(data: bytes, size: int, fast: bool = False) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size,
                                  fastdct=fast, fastupsample=fast)


def kernels() -> dict[str, object]:
    bicubic = Image.Resampling.BICUBIC
    out = {
        "PIL full decode + PIL resize": lambda d, s: np.asarray(
            Image.open(io.BytesIO(d)).convert("RGB").resize((s, s), bicubic)),
        "PIL draft + PIL resize": lambda d, s: np.asarray(_pil_draft(d, s).resize((s, s), bicubic)),
        "PIL draft + PIL resize(reducing_gap=2)": lambda d, s: np.asarray(
            _pil_draft(d, s).resize((s, s), bicubic, reducing_gap=2.0)),
        "PIL draft + torch uint8 resize": lambda d, s: _torch_resize(
            np.array(_pil_draft(d, s), dtype=np.uint8), s),
    }
    if image_ops.simplejpeg is not None:
        out.update({
            "simplejpeg + torch uint8 resize (ours)": lambda d, s: _torch_resize(
                _simplejpeg(d, s), s),
            "simplejpeg + PIL resize": lambda d, s: np.asarray(
                Image.fromarray(_simplejpeg(d, s)).resize((s, s), bicubic)),
            "simplejpeg fast DCT/upsample + torch resize": lambda d, s: _torch_resize(
                _simplejpeg(d, s, fast=True), s),
        })
    return out


def bench_kernel(kernel, jpegs: list[bytes], size: int, samples: int) -> float:
    seen, t0 = 0, time.process_time()
    while seen < samples:
        for data in jpegs:
            kernel(data, size)
            seen += 1
    return seen / (time.process_time() - t0)


def read_jpegs(root: Path) -> list[bytes]:
    out = []
    for shard in sorted(root.glob("bench-*.tar")):
        with tarfile.open(shard) as tf:
            out += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    return out


# Stage 1 reads image-text pairs (captions); stage 2 a mixture of grounded tasks.
STAGES = (
    ("stage 1 (224 px)", ("caption",),
     {"template": "pretrain", "image_size": 224, "seq_len": 512, "pack": False}, 8),
    ("stage 2 (448 px, packed 2048)", ("caption", "vqa", "ref_grounding", "grounded_caption"),
     {"template": "multitask", "image_size": 448, "seq_len": 2048, "pack": True}, 2),
)


def measure_stage(root: Path, stage: dict, mb: int, samples: int, rounds: int
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Best rate of each method over `rounds` interleaved rounds: on a shared machine the
    least disturbed round is the truest, and interleaving exposes all methods alike."""
    size = stage["image_size"]
    jpegs = read_jpegs(root)
    methods = {"ours": lambda: bench_ours(root, stage, samples, mb, workers=0),
               "before (PIL draft, float batches)": lambda: bench_before(root, stage, samples,
                                                                          mb),
               "naive PIL": lambda: bench_naive(root, size, samples),
               "open_clip-style webdataset": lambda: bench_openclip(root, size, samples, mb)}
    kern = kernels()
    rates = dict.fromkeys(methods, 0.0)
    krates = dict.fromkeys(kern, 0.0)
    for _ in range(rounds):
        for name, run in methods.items():
            rates[name] = max(rates[name], run())
        for name, kernel in kern.items():
            krates[name] = max(krates[name], bench_kernel(kernel, jpegs, size, samples))
    return rates, krates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200, help="samples in each shard set")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best counts)")
    ap.add_argument("--no-worker", action="store_true", help="skip the DataLoader-worker run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"simplejpeg: {'installed' if image_ops.simplejpeg is not None else 'missing'}; "
          f"{args.samples} JPEGs {W}x{H} per set; best of {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for label, tasks, stage, mb in STAGES:
            root = Path(tmp) / stage["template"]
            build_shards(root, args.samples, tasks)
            rates, kern = measure_stage(root, stage, mb, args.samples, args.rounds)
            best = max(kern, key=kern.get)
            ours = rates["ours"]
            print(f"\n{label}, tasks {', '.join(tasks)}: samples per CPU-second (one process)")
            for name, rate in rates.items():
                print(f"  {name:44s} {rate:8.1f}   ours = {ours / rate:5.2f}x")
            print("  decode + resize kernels (no tar, JSON, tokens, packing):")
            for name, rate in kern.items():
                mark = "  <- best" if name == best else ""
                print(f"    {name:42s} {rate:8.1f}   ours = {ours / rate:5.2f}x{mark}")
            print(f"  targets: ours >= 2x naive PIL: {ours / rates['naive PIL']:.2f}x; "
                  f">= 0.8x best kernel: {ours / kern[best]:.2f}x")
            if not args.no_worker:
                wall = bench_ours(root, stage, args.samples, mb, workers=1)
                print(f"  ours through 1 DataLoader worker (wall-clock samples/s): {wall:.1f}")


if __name__ == "__main__":
    main()
