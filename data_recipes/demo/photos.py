"""Caption samples from real photos that ship inside packages, with our one-line captions.

Only files that are on disk after `pip install` are used (scikit-image's bundled
`skimage/data/*`, not the ones its pooch registry would download). Light deterministic
augmentation (crops of 80-100% of each side, horizontal flips where the image has no text)
multiplies the ~20 photos into a few hundred samples; captions avoid words like "left" that a
flip would make false.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from PIL import Image

from data_recipes.common import Converted
from data_recipes.demo.assets import jpeg, package_file

MAX_SIDE = 224


@dataclass(frozen=True)
class Photo:
    name: str
    package: str
    path: tuple[str, ...]
    captions: tuple[str, ...]
    flip: bool = True


def _sk(name: str, file: str, *captions: str, flip: bool = True) -> Photo:
    return Photo(name, "skimage", ("data", file), captions, flip)


PHOTOS: tuple[Photo, ...] = (
    _sk("astronaut", "astronaut.png",
        "Astronaut Eileen Collins in an orange flight suit, holding her helmet.",
        "A smiling astronaut in an orange suit next to a model of the space shuttle."),
    _sk("camera", "camera.png",
        "A black and white photo of a man looking through a camera on a tripod.",
        "A cameraman standing on a lawn with his camera on a tripod."),
    _sk("chelsea", "chelsea.png", "A close-up of a tabby cat with green eyes.",
        "A cat looking straight at the camera."),
    _sk("coffee", "coffee.png", "A cup of coffee on a red saucer on a wooden table.",
        "An espresso cup with a spoon on a saucer."),
    _sk("coins", "coins.png", "Ancient Greek coins laid out in rows on a dark background.",
        "A black and white photo of old coins arranged in a grid."),
    _sk("rocket", "rocket.jpg", "A rocket on its launch pad at dusk.",
        "A rocket standing between towers on a launch pad, lit up at night."),
    _sk("hubble", "hubble_deep_field.jpg",
        "A deep field telescope image with thousands of distant galaxies.",
        "Colourful galaxies scattered across a black sky."),
    _sk("moon", "moon.png", "A grey close-up of the surface of the moon with small craters."),
    _sk("retina", "retina.jpg", "A photo of a human retina with red blood vessels.",
        "A fundus image of the back of a human eye."),
    _sk("brick", "brick.png", "A grey brick wall seen at an angle."),
    _sk("grass", "grass.png", "A black and white close-up of grass."),
    _sk("gravel", "gravel.png", "A black and white close-up of small gravel stones."),
    _sk("motorcycle", "motorcycle_left.png", "A red motorcycle parked in a garage.",
        "A red and black motorcycle standing on a concrete floor next to shelves."),
    _sk("page", "page.png", "A scanned page of a book about image segmentation.",
        flip=False),
    _sk("formulas", "text.png", "Handwritten mathematical formulas on a sheet of paper.",
        flip=False),
    _sk("clock", "clock_motion.png", "A motion-blurred photo of a small clock."),
    _sk("ihc", "ihc.png",
        "A microscope image of tissue stained brown and blue.",
        "Immunohistochemical staining of tissue seen under a microscope."),
    _sk("cell", "cell.png", "A microscope image of a single cell floating in saline."),
    Photo("pagoda", "sklearn", ("datasets", "images", "china.jpg"),
          ("A colourful Chinese pagoda on a hill above a lake.",
           "A tall temple tower surrounded by trees on a sunny day.")),
    Photo("dahlia", "sklearn", ("datasets", "images", "flower.jpg"),
          ("An orange dahlia in front of a dark green background.",
           "A close-up of an orange flower with many petals.")),
    Photo("hopper", "matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"),
          ("A portrait of Grace Hopper in her navy uniform.",
           "An elderly woman in a navy uniform and cap in front of a flag.")),
)


@cache
def load_photo(photo: Photo) -> Image.Image | None:
    """The photo as RGB, pre-shrunk (crops are taken from this), or None if not installed."""
    path = package_file(photo.package, *photo.path)
    if path is None:
        return None
    with Image.open(path) as im:
        im = im.convert("RGB")
    im.thumbnail((2 * MAX_SIDE, 2 * MAX_SIDE), Image.Resampling.BICUBIC)
    return im


def available_photos() -> list[tuple[Photo, Image.Image]]:
    return [(p, im) for p in PHOTOS if (im := load_photo(p)) is not None]


def augment(im: Image.Image, rng: random.Random, flip: bool) -> Image.Image:
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = im.crop((x, y, x + cw, y + ch))
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def shrink(im: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    im = im.copy()
    im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return im


def caption_samples(n: int, seed: int = 0, held_out: bool = False) -> list[Converted]:
    """`n` caption samples: each photo once unaugmented, then augmented variants in turn.
    `held_out`: fresh augmented views only (keys `photo_{name}_val{i}`), each with every
    caption of its photo as references (`captions`)."""
    photos = available_photos()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        photo, im = photos[i % len(photos)]
        variant = i // len(photos)
        fresh = held_out or variant > 0
        view = shrink(augment(im, rng, photo.flip) if fresh else im)
        caption = photo.captions[variant % len(photo.captions)]
        record = {"task": "caption", "source": "demo_photos",
                  "images": [{"width": view.width, "height": view.height}], "caption": caption}
        if held_out:
            record["captions"] = list(photo.captions)
        key = f"photo_{photo.name}_{'val' if held_out else ''}{variant:03d}"
        out.append(Converted(key, record, [("jpg", jpeg(view))]))
    return out
