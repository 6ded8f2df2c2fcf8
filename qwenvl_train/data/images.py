"""Image decode + resize: RGB, bicubic resize to (S, S) (aspect not kept), uint8 out.

The data path stops at uint8 [3, S, S]: batches travel as uint8 (4x fewer bytes from the
workers than float) and the model normalises them on its device
(`model/vision.py:normalize_images`, CLIP mean/std). Speed matters here (the loader is
image-bound), three tricks:
* JPEGs are decoded at reduced size in the DCT domain: the decoder's scaling yields the
  image at 1/2, 1/4 or 1/8 size directly, as long as both sides stay >= S, so less is
  decoded and resized. `simplejpeg` (libjpeg-turbo straight to a numpy array) does it when
  installed; otherwise PIL's draft mode does the same through a PIL image. Both use
  libjpeg-turbo's accurate DCT and fancy upsampling, so their pixels agree (tested);
  other formats, CMYK JPEGs and anything simplejpeg refuses go through PIL;
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

try:  # optional: a faster JPEG path (no torch dependency); PIL decodes everything too
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")  # decoded to RGB exactly as PIL does


def open_image(data: bytes, *, max_pixels: int | None = None,
               expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Open (header only) and check size limits; raises SampleError."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many exception types for garbage
        raise SampleError("bad_image", f"cannot open image: {e}") from None
    check_size(*img.size, max_pixels=max_pixels, expected_size=expected_size)
    return img


def check_size(w: int, h: int, *, max_pixels: int | None,
               expected_size: tuple[int, int] | None) -> None:
    """The size limits of a header (before any pixel is decoded); raises SampleError."""
    if max_pixels and w * h > max_pixels:
        raise SampleError("image_too_large", f"{w}x{h} > {max_pixels} px")
    if expected_size is not None and (w, h) != tuple(expected_size):
        raise SampleError("bad_image", f"image is {w}x{h}, record declares "
                          f"{expected_size[0]}x{expected_size[1]}")


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


def resize_uint8(pixels: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """RGB PIL image or uint8 [H, W, 3] array -> bicubic (antialiased) resize -> uint8
    [3, size, size]."""
    arr = pixels if isinstance(pixels, np.ndarray) else np.array(pixels, dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    if x.shape[-2:] != (size, size):
        # uint8 channels-last input takes torch's vectorised path
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
    return x[0]


def stack_into(out: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    """Images [n_i, 3, S, S] -> written one after another into `out` [N, 3, S, S] (any
    dtype: uint8 -> float converts, channels-last -> planar)."""
    i = 0
    for x in images:
        out[i:i + x.shape[0]].copy_(x)
        i += x.shape[0]
    return out



def decode_jpeg_scaled(data: bytes, size: int, *, max_pixels: int | None = None,
                       expected_size: tuple[int, int] | None = None) -> np.ndarray | None:
    """A JPEG -> RGB uint8 [H, W, 3] at the smallest DCT scale keeping both sides >= size,
    through simplejpeg. None when simplejpeg is missing, the data is not a JPEG, is CMYK /
    YCCK, or cannot be decoded (damaged data): the PIL path then decides. Raises SampleError
    for a header over the size limits."""
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    check_size(w, h, max_pixels=max_pixels, expected_size=expected_size)
    if colorspace not in _SIMPLEJPEG_COLORSPACES:
        return None  # CMYK/YCCK: PIL's conversion, as before
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size,
                                      min_width=size)
    except ValueError:  # strict: truncated or corrupt data, or an unsupported colour space
        return None


def load_image_uint8(data: bytes, size: int, *, max_pixels: int | None = None,
                     expected_size: tuple[int, int] | None = None, draft: bool = True
                     ) -> torch.Tensor:
    """Encoded bytes -> uint8 [3, size, size], resized. Raises SampleError (bad_image,
    image_too_large). `draft=False`: full-size decode (PIL), for reference outputs."""
    if draft:
        pixels = decode_jpeg_scaled(data, size, max_pixels=max_pixels,
                                    expected_size=expected_size)
        if pixels is not None:
            return resize_uint8(pixels, size)
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
    """Encoded bytes -> CLIP-normalised float32 [3, size, size] (for eval / tools), with
    the model's own normalisation."""
    from qwenvl_train.model.vision import normalize_images  # model imports this module

    x = load_image_uint8(data, size, **kwargs)
    return normalize_images(x.unsqueeze(0), torch.float32)[0]
