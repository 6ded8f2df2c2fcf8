"""COCO Captions (`annotations/captions_{train,val}2017.json` + image dir) -> `caption`.

The annotation file is one JSON object with `images` ([{id, file_name, width, height}])
and `annotations` ([{id, image_id, caption}]). Both arrays are streamed: a first pass
keeps only id -> file name (small), the second pass yields one item per caption.
One sample per caption (COCO has ~5 per image), as caption pretraining uses them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from data_recipes.common import Converted, Skip, image_dir, load_image
from data_recipes.jsonstream import iter_array
from data_recipes.runner import Converter


def clean_caption(text: Any) -> str:
    return " ".join(str(text or "").split())


class CocoCaptions(Converter):
    name = "coco_captions"
    task = "caption"

    def __init__(self, src: str, image_root: str | None = None, source: str = "coco"):
        self.src = src
        # Default layout: annotations/captions_train2017.json next to train2017/.
        if image_root is None:
            split = os.path.basename(src).removeprefix("captions_").removesuffix(".json")
            image_root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(src))),
                                      split)
            self.image_root = image_dir(image_root, "COCO's layout: annotations/ beside "
                                                    f"{split}/")
        else:
            self.image_root = image_dir(image_root)
        self.source = source

    def items(self) -> Iterator[Any]:
        files = {im["id"]: im["file_name"] for im in iter_array(self.src, "images")}
        for ann in iter_array(self.src, "annotations"):
            yield ann.get("id"), files.get(ann.get("image_id")), ann.get("caption")

    def item_key(self, item: Any) -> str:
        return f"coco{item[0]}"

    def convert(self, item: Any) -> Converted:
        ann_id, file_name, caption = item
        if file_name is None:
            raise Skip("unknown_image_id")
        caption = clean_caption(caption)
        if not caption:
            raise Skip("empty_caption")
        im = load_image(os.path.join(self.image_root, file_name))
        record = {"task": "caption", "source": self.source,
                  "images": [{"width": im.width, "height": im.height}], "caption": caption}
        return Converted(self.item_key(item), record, [(im.ext, im.data)])
