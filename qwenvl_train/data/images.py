"""Image decode + transform: RGB, bicubic resize to (S, S) (aspect not kept), CLIP norm.

Speed matters here (the loader is image-bound), two tricks:
* JPEGs are decoded in draft mode: the decoder's DCT scaling yields the image at 1/2, 1/4
  or 1/8 size directly, as long as both sides stay >= S, so less is decoded and resized;
* the resize is torch's uint8 antialiased bicubic (vectorised; ~5x PIL's on one core),
  which follows PIL's bicubic filter (a = -0.5, antialiased) to within 2 grey levels.
Results differ from a full decode + PIL resize by a few grey levels, the usual trade
(open_clip and DALI make the same one).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .schema import Sample, SampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# x_norm = x_uint8 * scale + shift, per channel (one fused multiply-add).
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD]).view(3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]).view(3, 1, 1)


def open_image(data: bytes, *, max_pixels: int | None = None,
               expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Open (header only) and check size limits; raises SampleError."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # a huge image, whatever the record declared
        raise SampleError("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many exception types for garbage
        raise SampleError("bad_image", f"cannot open image: {e}") from None
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        raise SampleError("image_too_large", f"{w}x{h} > {max_pixels} px")
    if expected_size is not None and (w, h) != tuple(expected_size):
        raise SampleError("bad_image", f"image is {w}x{h}, record declares "
                          f"{expected_size[0]}x{expected_size[1]}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent images are composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float greyscale
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> bicubic (antialiased) resize -> uint8 [3, size, size]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    if img.size != (size, size):
        # uint8 channels-last input takes torch's vectorised path
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
    return x[0]


def normalize_into(out: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images [n_i, 3, S, S] -> CLIP-normalised float written into `out` [N, 3, S, S].

    Images travel through the pipeline as uint8 (4x less memory in packing buffers) and
    become float only here, written straight into the batch tensor: one pass, no
    per-image float copies."""
    i = 0
    for x in images:
        out[i:i + x.shape[0]].copy_(x)  # uint8 -> float, channels-last -> planar
        i += x.shape[0]
    return out.mul_(_SCALE).add_(_SHIFT)


def load_image_uint8(data: bytes, size: int, *, max_pixels: int | None = None,
                     expected_size: tuple[int, int] | None = None, draft: bool = True
                     ) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, size, size], resized. Raises SampleError (bad_image,
    image_too_large)."""
    img = open_image(data, max_pixels=max_pixels, expected_size=expected_size)
    try:
        if draft and img.format == "JPEG":
            # Asks the decoder for the smallest DCT scale keeping both sides >= size.
            img.draft("RGB", (size, size))
        img.load()
        img = to_rgb(img)
    except Exception as e:  # truncated/corrupt data surfaces only at decode time
        raise SampleError("bad_image", f"decode failed: {e}") from None
    return resize_uint8(img, size)


def decode_images(sample: Sample, order: list[int], size: int, *,
                  max_pixels: int | None) -> torch.Tensor:
    """The images of `sample` its tokens use (`order`: image index of each `<img>` span)
    -> uint8 [n, 3, size, size]. `sample.images` holds the encoded bytes."""
    pix = [load_image_uint8(sample.images[i], size, max_pixels=max_pixels,
                            expected_size=sample.image_sizes[i]) for i in order]
    if not pix:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return pix[0].unsqueeze(0) if len(pix) == 1 else torch.stack(pix)


def load_image(data: bytes, size: int, **kwargs) -> torch.Tensor:
    """Encoded bytes -> CLIP-normalised float32 [3, size, size] (for eval / tools)."""
    x = load_image_uint8(data, size, **kwargs)
    return normalize_into(torch.empty((1, 3, size, size)), [x.unsqueeze(0)])[0]
