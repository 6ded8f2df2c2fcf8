"""Converters from public data sets into qwenvl-train shards, and the offline demo set.

`RECIPES` maps a recipe name (as used by `qwenvl-data convert <recipe>`) to its converter
class; `run_conversion(converter, out_dir, ...)` runs one. See data_recipes/README.md.
"""

from __future__ import annotations

from data_recipes.coco_captions import CocoCaptions
from data_recipes.grit import GRIT
from data_recipes.img2dataset import Img2Dataset
from data_recipes.llava import LLaVA
from data_recipes.qwenvl_json import QwenVLJson
from data_recipes.refcoco import RefCOCO
from data_recipes.runner import Converter, run_conversion
from data_recipes.synthdog import SynthDoG
from data_recipes.text import TextJSONL
from data_recipes.vqa import GQA, VQATable, VQAv2

RECIPES: dict[str, type[Converter]] = {
    c.name: c
    for c in (QwenVLJson, LLaVA, CocoCaptions, VQAv2, GQA, VQATable, RefCOCO, GRIT,
              SynthDoG, Img2Dataset, TextJSONL)
}

__all__ = ["RECIPES", "Converter", "run_conversion"]
