"""Rendered scenes of coloured shapes with exact boxes: grounding, referring expressions and
grounded captions whose answers can be read off the pixels.

Box convention: pixel column x covers [x, x + 1), so a shape drawn on columns x1..x2-1 has
the box [x1, y1, x2, y2] -- exactly the extent of its pixels.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_recipes.common import Converted
from data_recipes.demo.assets import png

SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 170), "orange": (245, 130, 30)}
NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]

    def member(self) -> tuple[str, bytes]:
        return "png", png(self.image)

    def size(self) -> dict[str, int]:
        return {"width": self.image.width, "height": self.image.height}


def _draw(d: ImageDraw.ImageDraw, o: Obj) -> None:
    x1, y1, x2, y2 = o.box
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif o.shape == "square":
        d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        d.polygon([(x1, y2 - 1), ((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1)], fill=fill)


def _overlaps(a: tuple[int, ...], b: tuple[int, ...], gap: int = 6) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1]
                or b[3] + gap <= a[1])


def make_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """2-4 non-overlapping shapes; shapes and colours drawn with replacement so that
    scenes often need "on the left"/"at the top" to tell two objects apart."""
    n = n_objects or rng.randint(2, 4)
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    objects: list[Obj] = []
    while len(objects) < n:
        side = rng.randint(34, 64)
        x, y = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
        box = (x, y, x + side, y + side)
        if any(_overlaps(box, o.box) for o in objects):
            continue
        objects.append(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), box))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    for o in objects:
        _draw(d, o)
    return Scene(im, objects)


def _position(o: Obj, group: list[Obj]) -> str | None:
    """'on the left' etc. for one of two look-alikes, when they are clearly apart."""
    if len(group) != 2:
        return None
    other = group[1] if group[0] is o else group[0]
    if abs(o.cx - other.cx) >= 24:
        return "on the left" if o.cx < other.cx else "on the right"
    if abs(o.cy - other.cy) >= 24:
        return "at the top" if o.cy < other.cy else "at the bottom"
    return None


def referring_expressions(scene: Scene, o: Obj) -> list[str]:
    """Every expression that picks out `o` alone in the scene."""
    objs = scene.objects
    same_name = [p for p in objs if p.name == o.name]
    same_shape = [p for p in objs if p.shape == o.shape]
    exprs = []
    if len(same_name) == 1:
        exprs.append(f"the {o.name}")
    elif pos := _position(o, same_name):
        exprs.append(f"the {o.name} {pos}")
    if len(same_shape) == 1:
        exprs.append(f"the {o.shape}")
    elif pos := _position(o, same_shape):
        exprs.append(f"the {o.shape} {pos}")
    if sum(p.colour == o.colour for p in objs) == 1:
        exprs.append(f"the {o.colour} shape")
    return exprs


def noun_phrases(scene: Scene) -> list[tuple[str, list[Obj]]]:
    """'a red circle' / 'an orange square' / 'two blue squares' per distinct colour+shape,
    left to right."""
    groups: dict[str, list[Obj]] = {}
    for o in sorted(scene.objects, key=lambda p: (p.cx, p.cy)):
        groups.setdefault(o.name, []).append(o)
    return [(f"{'an' if name[0] in 'aeiou' else 'a'} {name}" if len(g) == 1
             else f"{NUMBERS[len(g)]} {name}s", g)
            for name, g in groups.items()]


def _base(task: str, scene: Scene) -> dict:
    return {"task": task, "source": "demo_scenes", "images": [scene.size()]}


def grounding_sample(key: str, rng: random.Random) -> Converted:
    scene = make_scene(rng)
    refs = [{"expression": phrase, "boxes": [list(o.box) for o in g]}
            for phrase, g in noun_phrases(scene)]
    counts = Counter(o.shape for o in scene.objects)
    refs += [{"expression": f"{NUMBERS[n]} {s}s", "boxes": [list(o.box) for o in scene.objects
                                                          if o.shape == s]}
             for s, n in sorted(counts.items()) if n > 1 and rng.random() < 0.5]
    return Converted(key, {**_base("grounding", scene), "refs": refs}, [scene.member()])


def ref_grounding_sample(key: str, rng: random.Random) -> Converted:
    while True:
        scene = make_scene(rng)
        refs = [{"expression": rng.choice(ex), "boxes": [list(o.box)]}
                for o in scene.objects if (ex := referring_expressions(scene, o))]
        if refs:
            break
    rng.shuffle(refs)
    return Converted(key, {**_base("ref_grounding", scene), "refs": refs}, [scene.member()])


CAPTION_FORMS = ("{}.", "This image shows {}.", "A picture of {} on a plain background.")


def grounded_caption(scene: Scene, rng: random.Random) -> tuple[str, list[dict]]:
    phrases = noun_phrases(scene)
    form = rng.choice(CAPTION_FORMS)
    head, tail = form.split("{}")
    text, spans = head, []
    for i, (phrase, g) in enumerate(phrases):
        if i:
            text += " and " if i == len(phrases) - 1 else ", "
        if not head and i == 0:
            phrase = phrase[0].upper() + phrase[1:]
        spans.append({"start": len(text), "end": len(text) + len(phrase),
                      "boxes": [list(o.box) for o in g]})
        text += phrase
    return text + tail, spans


def grounded_caption_sample(key: str, rng: random.Random) -> Converted:
    scene = make_scene(rng)
    caption, spans = grounded_caption(scene, rng)
    record = {**_base("grounded_caption", scene), "caption": caption, "spans": spans}
    return Converted(key, record, [scene.member()])
