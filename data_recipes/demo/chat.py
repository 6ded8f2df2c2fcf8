"""Dialogues for the SFT stage, built from the other demo material: photo descriptions,
multi-turn VQA, grounding turns (pixel boxes and [0,1000) boxes), multi-image comparisons,
reading text, and text-only turns."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from data_recipes.common import Converted
from data_recipes.demo import documents, photos, scenes, vqa
from data_recipes.demo.assets import jpeg, png

Part = dict[str, Any]


def text(t: str) -> Part:
    return {"type": "text", "text": t}


def image(i: int) -> Part:
    return {"type": "image", "image": i}


def turn(role: str, *parts: Part) -> dict[str, Any]:
    return {"role": role, "content": list(parts)}


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def photo_dialogue(rng: random.Random) -> tuple[list, list, list]:
    photo, im = rng.choice(photos.available_photos())
    view = photos.shrink(photos.augment(im, rng, photo.flip))
    ask = rng.choice(("What is in this picture?", "Describe this image.",
                      "What do you see here?"))
    msgs = [turn("user", image(0), text(ask)), turn("assistant", text(rng.choice(photo.captions)))]
    return msgs, [{"width": view.width, "height": view.height}], [("jpg", jpeg(view))]


def vqa_dialogue(rng: random.Random) -> tuple[list, list, list]:
    image_id = rng.choice(vqa.image_ids(2000, offset=1000))  # images the vqa task does not use
    msgs: list = []
    for i, (q, a) in enumerate(vqa.pick_qa(image_id, rng, rng.randint(1, 3))):
        msgs += [turn("user", *([image(0)] if i == 0 else []), text(q)),
                 turn("assistant", text(a[:1].upper() + a[1:] + "."))]
    return msgs, [{"width": 64, "height": 64}], [("png", vqa.image_bytes(image_id))]


def grounding_dialogue(rng: random.Random) -> tuple[list, list, list]:
    scene = scenes.make_scene(rng)
    caption, _ = scenes.grounded_caption(scene, rng)
    msgs = [turn("user", image(0), text("What shapes are in this picture?")),
            turn("assistant", text(caption))]
    targets = [(o, ex) for o in scene.objects if (ex := scenes.referring_expressions(scene, o))]
    for o, exprs in rng.sample(targets, min(2, len(targets))):
        expr = rng.choice(exprs)
        if rng.random() < 0.5:  # pixel box of image 0
            box = {"type": "box", "ref": expr, "image": 0, "boxes": [list(o.box)]}
        else:  # already normalised, as in the Qwen-VL fine-tuning data
            b = [int(c / scenes.SIZE * 1000) for c in o.box]
            box = {"type": "box", "ref": expr, "boxes_1000": [b]}
        msgs += [turn("user", text(f"Where is {expr}?")), turn("assistant", box)]
    return msgs, [scene.size()], [scene.member()]


def multi_image_dialogue(rng: random.Random) -> tuple[list, list, list]:
    a, b = scenes.make_scene(rng), scenes.make_scene(rng)
    na, nb = len(a.objects), len(b.objects)
    answer = (f"The first picture has {na} shapes and the second has {nb}."
              if na != nb else f"Both pictures have {na} shapes.")
    msgs = [turn("user", image(0), image(1), text("How many shapes are in each picture?")),
            turn("assistant", text(answer))]
    return msgs, [a.size(), b.size()], [a.member(), b.member()]


def photo_pair_dialogue(rng: random.Random) -> tuple[list, list, list]:
    (p1, im1), (p2, im2) = rng.sample(photos.available_photos(), 2)
    v1, v2 = photos.shrink(im1), photos.shrink(im2)
    msgs = [turn("user", image(0), text("What is this?")),
            turn("assistant", text(p1.captions[0])),
            turn("user", image(1), text("And this one?")),
            turn("assistant", text(f"This one shows {_lower_first(p2.captions[0])}"))]
    sizes = [{"width": v.width, "height": v.height} for v in (v1, v2)]
    return msgs, sizes, [("jpg", jpeg(v1)), ("jpg", jpeg(v2))]


def reading_dialogue(rng: random.Random) -> tuple[list, list, list]:
    im, regions = documents.render_document(rng, chinese=False)
    msgs = [turn("user", image(0), text("What does the text say?")),
            turn("assistant", text("\n".join(r["text"] for r in regions)))]
    return msgs, [{"width": im.width, "height": im.height}], [("png", png(im))]


def text_dialogue(rng: random.Random) -> tuple[list, list, list]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    qa = rng.choice([
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
        ("Which shape has three sides?", "A triangle has three sides."),
        ("Which shape has four equal sides?", "A square has four equal sides."),
        ("Hello!", "Hello! How can I help you today?"),
    ])
    msgs = [turn("user", text(qa[0])), turn("assistant", text(qa[1]))]
    if rng.random() < 0.3:  # the template's default system prompt, written out
        msgs.insert(0, turn("system", text("You are a helpful assistant.")))
    return msgs, [], []


KINDS: tuple[Callable[[random.Random], tuple[list, list, list]], ...] = (
    photo_dialogue, vqa_dialogue, grounding_dialogue, multi_image_dialogue,
    photo_pair_dialogue, reading_dialogue, text_dialogue, grounding_dialogue,
)


def chat_samples(n: int, seed: int = 0) -> list[Converted]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        msgs, sizes, members = kind(rng)
        record = {"task": "chat", "source": "demo_chat", "images": sizes, "messages": msgs}
        out.append(Converted(f"chat_{i:05d}", record, members))
    return out
