"""The module registry (model/groups.py) is true of the built model and complete: every
tensor has one part and one pipeline slot, every tensor-parallel and LoRA target is a
linear, and nothing the consumers need escapes it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from model_helpers import tiny_config
from torch import nn

from qwenvl_train.model import groups as G
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.training.observe import flops

CFG = tiny_config()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build_model(CFG, 224)


def test_names_and_parallel_config_import_without_torch():
    code = ("import sys, qwenvl_train.model.groups, qwenvl_train.training.parallel.config; "
            "print([m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_every_registry_name_exists(model):
    modules = dict(model.named_modules())
    tensors = model.state_dict()
    paths = (*G.VIT_EMBED, G.VIT_BLOCKS, G.ADAPTER_QUERY, G.ADAPTER_POS, *G.ADAPTER_LINEARS,
             *G.ADAPTER_POST, G.LLM_BASE, G.LLM_EMBED, G.LLM_LAYERS, G.LLM_ROTARY, G.LLM_NORM,
             G.LLM_HEAD)
    assert [p for p in paths if p not in modules and p not in tensors] == []
    for rel in (f.default for f in dataclasses.fields(G.ViTBlockNames)):
        assert f"{G.vit_block(CFG.vision.layers - 1)}.{rel}" in modules, rel
    for rel in (f.default for f in dataclasses.fields(G.DecoderLayerNames)):
        assert f"{G.llm_layer(CFG.llm.num_layers - 1)}.{rel}" in modules, rel
    assert G.local(G.LLM_NORM) == "model.norm"
    with pytest.raises(ValueError, match="text_encoder"):
        G.local("text_encoder.proj")


def test_every_tensor_has_one_part_and_one_pipeline_slot(model):
    tensors = model.state_dict()
    slot_of: dict[str, list[str]] = {}
    slots = G.pipeline_slots(CFG.llm.num_layers)
    assert [s.name for s in slots] == ["vision+embed", "decoder.0", "decoder.1", "norm+head"]
    for slot in slots:
        for path in slot.modules.values():
            for name in model.get_submodule(path).state_dict():
                slot_of.setdefault(f"{path}.{name}", []).append(slot.name)
    assert slot_of.keys() == tensors.keys()
    assert [n for n, s in slot_of.items() if len(s) != 1] == []
    assert {G.part_of(n) for n in tensors} == set(G.PARTS)
    assert G.part_of("adapter.proj") == "adapter_post"
    assert G.group_of("adapter.proj", post_group="adapter") == "adapter"
    assert set(flops.forward_flops_by_part(CFG, 224, 8, 1, 8)) == set(G.PARTS)


def test_tensor_parallel_and_lora_targets_are_the_model_linears(model):
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = G.tensor_parallel_plan(CFG)
    assert len(plan) == 4 * CFG.vision.layers + 7 * CFG.llm.num_layers
    assert set(plan) <= linears
    assert plan[f"{G.llm_layer(0)}.{G.LLM_LAYER.q}"] == G.COLUMN
    assert plan[f"{G.vit_block(1)}.{G.VIT_BLOCK.out}"] == G.ROW
    default = G.lora_targets(CFG)
    in_layers = {n for n in linears if n.startswith(G.LLM_LAYERS + ".")}
    assert len(default) == len(set(default)) and set(default) == in_layers
    # every linear but the LM head is a target when all groups are chosen
    assert linears - set(G.lora_targets(CFG, G.GROUPS)) == {G.LLM_HEAD}
    assert G.lora_targets(CFG, ["adapter"]) == list(G.ADAPTER_LINEARS)
    with pytest.raises(ValueError, match="decoder"):
        G.lora_targets(CFG, ["decoder"])
