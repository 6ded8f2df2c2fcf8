"""RefCOCO / RefCOCO+ / RefCOCOg -> `ref_grounding` or `grounded_caption`.

Source layout (the `refer` toolkit's, under its `data/` folder):

    refcoco/refs(unc).p  refcoco/instances.json        (refcoco+, refcocog/refs(umd).p alike)
    images/mscoco/images/train2014/COCO_train2014_*.jpg

`refs(...).p` is a pickled list of refs {ref_id, ann_id, image_id, split, sentences: [{sent,
raw}]}; `instances.json` is COCO format (images with file_name/width/height, annotations
with `bbox` = [x, y, width, height] in pixels). Images are COCO train2014, found where the
toolkit keeps them (`../images/mscoco/images/train2014` from the refs file) unless
`image_root` says otherwise. `split`: one split (`train`, the default), several
(`train,val`: converted in one run into the same shards) or `all`.

- `ref_grounding`: one sample per referred object; every sentence of it is an expression
  pointing at its box.
- `grounded_caption`: one sample per sentence; the whole sentence is the span with the box.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, clip_box, image_dir, load_image, xywh_to_xyxy
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


def refer_image_root(refs_path: str) -> str:
    """Where the refer toolkit keeps the COCO images, seen from a refs file."""
    data = os.path.dirname(os.path.dirname(os.path.abspath(refs_path)))
    return os.path.join(data, "images", "mscoco", "images", "train2014")


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
        self.image_root = image_dir(image_root) if image_root else image_dir(
            refer_image_root(src), "the refer toolkit's layout next to the refs file")
        # refcoco / refcoco+ / refcocog, from the directory the refs file sits in.
        self.source = source or os.path.basename(os.path.dirname(os.path.abspath(src)))

    def inputs(self) -> list[str]:
        return [self.src, self.instances]

    def splits(self) -> set[str] | None:
        """The requested splits; None = all."""
        names = {s.strip() for s in (self.split or "all").split(",") if s.strip()}
        return None if not names or "all" in names else names

    def items(self) -> Iterator[Any]:
        refs = load_refs(self.src)
        wanted = self.splits()
        present = {str(r.get("split")) for r in refs}
        if wanted is not None and wanted - present:
            raise ValueError(f"split {','.join(sorted(wanted - present))} not in {self.src} "
                             f"(it has {','.join(sorted(present))}; or --split all)")
        images = {im["id"]: im["file_name"] for im in iter_array(self.instances, "images")}
        boxes = {a["id"]: a["bbox"] for a in iter_array(self.instances, "annotations")}
        for ref in refs:
            if wanted is not None and ref.get("split") not in wanted:
                continue
            sents = [" ".join(str(s.get("sent") or s.get("raw") or "").split())
                     for s in ref.get("sentences", [])]
            yield (ref["ref_id"], images.get(ref["image_id"]), boxes.get(ref["ann_id"]),
                   [s for s in sents if s])

    def item_key(self, item: Any) -> str:
        return f"ref{item[0]}"

    def convert(self, item: Any) -> list[Converted]:
        ref_id, file_name, bbox, sents = item
        if file_name is None or bbox is None:
            raise Skip("unknown_annotation")
        if not sents:
            raise Skip("no_sentence")
        im = load_image(os.path.join(self.image_root, file_name))
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
