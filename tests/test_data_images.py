"""The uint8 image path: simplejpeg's DCT-scaled decode agrees with PIL's draft decode, the
PIL fallback covers what simplejpeg refuses, batches stay uint8 and the model's
`normalize_images` is the CLIP normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from data_fixtures import image_bytes
from PIL import Image

from qwenvl_train.data import images
from qwenvl_train.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    decode_jpeg_scaled,
    load_image,
    load_image_uint8,
)
from qwenvl_train.data.schema import SampleError
from qwenvl_train.model.vision import normalize_images

needs_simplejpeg = pytest.mark.skipif(images.simplejpeg is None,
                                      reason="simplejpeg not installed")


def photo_jpeg(w: int = 640, h: int = 480, mode: str = "RGB") -> bytes:
    """A smooth, photo-like JPEG (gradients and a disc), quality 90."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, ((x - w / 2) ** 2 + (y - h / 2) ** 2
                                                  < (h / 3) ** 2) * 200], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def pil_draft(data: bytes, size: int) -> torch.Tensor:
    """The PIL path of load_image_uint8 (draft decode), whatever is installed."""
    saved, images.simplejpeg = images.simplejpeg, None
    try:
        return load_image_uint8(data, size)
    finally:
        images.simplejpeg = saved


@needs_simplejpeg
@pytest.mark.parametrize("size,mode", [(224, "RGB"), (448, "RGB"), (224, "L"), (100, "RGB")])
def test_simplejpeg_matches_pil_draft(size, mode):
    data = photo_jpeg(mode=mode)
    pixels = decode_jpeg_scaled(data, size)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    assert pixels.shape == (img.size[1], img.size[0], 3)  # the same DCT scale as PIL picks
    assert min(pixels.shape[:2]) >= size
    ours, ref = load_image_uint8(data, size), pil_draft(data, size)
    assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
    # both are libjpeg-turbo with the accurate DCT and fancy upsampling
    assert (ours.int() - ref.int()).abs().max() <= 1


@needs_simplejpeg
def test_simplejpeg_refusals_fall_back_to_pil():
    cmyk = photo_jpeg(mode="CMYK")
    assert decode_jpeg_scaled(cmyk, 64) is None  # CMYK: PIL's conversion, as before
    assert load_image_uint8(cmyk, 64).shape == (3, 64, 64)
    png = image_bytes(64, 48, "PNG")
    assert decode_jpeg_scaled(png, 32) is None
    with pytest.raises(SampleError) as e:
        load_image_uint8(photo_jpeg()[:2000], 64)  # truncated: simplejpeg refuses, PIL too
    assert e.value.reason == "bad_image"


@needs_simplejpeg
def test_size_limits_come_from_the_header():
    data = photo_jpeg()
    with pytest.raises(SampleError) as e:
        decode_jpeg_scaled(data, 64, max_pixels=1000)
    assert e.value.reason == "image_too_large"
    with pytest.raises(SampleError) as e:
        decode_jpeg_scaled(data, 64, expected_size=(100, 100))
    assert e.value.reason == "bad_image"


def test_normalize_images_is_clip_normalisation():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = (x.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    out = normalize_images(x, torch.float32)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-6)
    assert torch.equal(normalize_images(x, torch.bfloat16), out.to(torch.bfloat16))
    assert normalize_images(out, torch.float32) is out  # float input: already normalised
    # load_image (evaluation, tools) uses the same normalisation
    data = image_bytes(64, 48, "PNG")
    assert torch.equal(load_image(data, 32),
                       normalize_images(load_image_uint8(data, 32)[None], torch.float32)[0])


def test_vision_tower_takes_uint8_and_normalised_images_alike():
    from model_helpers import tiny_config

    from qwenvl_train.model.vision import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(tiny_config().vision).eval()
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(vit(x), vit(normalize_images(x, torch.float32)))
