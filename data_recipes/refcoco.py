"""RefCOCO / RefCOCO+ / RefCOCOg -> `ref_grounding` or `grounded_caption`.

Source layout (the `refer` toolkit's): `refcoco/refs(unc).p` (`refcocog/refs(umd).p`), a
pickled list of refs {ref_id, ann_id, image_id, split, sentences: [{sent, raw}]}, and
`refcoco/instances.json` (COCO format: images with file_name/width/height, annotations with
`bbox` = [x, y, width, height] in pixels). Images are COCO train2014.

- `ref_grounding`: one sample per referred object; every sentence of it is an expression
  pointing at its box.
- `grounded_caption`: one sample per sentence; the whole sentence is the span with the box.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, clip_box, load_image, xywh_to_xyxy
from data_recipes.jsonstream import iter_array
from data_recipes.runner import Converter

TASKS = ("ref_grounding", "grounded_caption")


class _DataOnly(pickle.Unpickler):
    """The refs file holds only lists/dicts/str/int; refuse anything that imports code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs pickle references {module}.{name}; refusing")


def load_refs(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        # The files were written by Python 2: str objects come back as utf-8 text.
        return _DataOnly(f, encoding="utf-8", errors="replace").load()


class RefCOCO(Converter):
    name = "refcoco"
    option_choices = {"task": TASKS}

    def __init__(self, src: str, instances: str | None = None, image_root: str | None = None,
                 split: str | None = "train", task: str = "ref_grounding",
                 source: str | None = None):
        if task not in TASKS:
            raise ValueError(f"task: {task!r}, expected one of {TASKS}")
        self.src, self.split, self.task = src, split, task
        self.instances = instances or os.path.join(os.path.dirname(src), "instances.json")
        self.image_root = image_root
        # refcoco / refcoco+ / refcocog, from the directory the refs file sits in.
        self.source = source or os.path.basename(os.path.dirname(os.path.abspath(src)))

    def items(self) -> Iterator[Any]:
        images = {im["id"]: im["file_name"] for im in iter_array(self.instances, "images")}
        boxes = {a["id"]: a["bbox"] for a in iter_array(self.instances, "annotations")}
        for ref in load_refs(self.src):
            if self.split and ref.get("split") != self.split:
                continue
            sents = [" ".join(str(s.get("sent") or s.get("raw") or "").split())
                     for s in ref.get("sentences", [])]
            yield (ref["ref_id"], images.get(ref["image_id"]), boxes.get(ref["ann_id"]),
                   [s for s in sents if s])

    def _image(self, file_name: str):
        root = self.image_root or os.path.dirname(os.path.abspath(self.instances))
        return load_image(os.path.join(root, file_name))

    def convert(self, item: Any) -> list[Converted]:
        ref_id, file_name, bbox, sents = item
        if file_name is None or bbox is None:
            raise Skip("unknown_annotation")
        if not sents:
            raise Skip("no_sentence")
        im = self._image(file_name)
        box = clip_box(xywh_to_xyxy(bbox), im.width, im.height)
        if box is None:
            raise Skip("empty_box")
        base = {"source": self.source, "images": [{"width": im.width, "height": im.height}]}
        members = [(im.ext, im.data)]
        if self.task == "ref_grounding":
            record = {"task": "ref_grounding", **base,
                      "refs": [{"expression": s, "boxes": [box]} for s in sents]}
            return [Converted(f"ref{ref_id}", record, members)]
        return [
            Converted(f"ref{ref_id}_{i}", {"task": "grounded_caption", **base, "caption": s,
                                           "spans": [{"start": 0, "end": len(s),
                                                      "boxes": [box]}]}, members)
            for i, s in enumerate(sents)
        ]
