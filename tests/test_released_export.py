"""Export to the released Qwen-VL layout: the exact inverse of the importer (bitwise), its
config.json against the released one, and import's handling of keys it does not know."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from model_helpers import released_ckpt, tiny_config
from safetensors.torch import save_file
from source_helpers import RELEASED_CHAT_CONFIG, save_hf_qwen2, save_released

from qwenvl_train.config import load_config
from qwenvl_train.model.config import QwenVLConfig, WeightsConfig
from qwenvl_train.model.export import export_model, is_chat_export, load_for_inference
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.model.released import released_config, released_state_dict
from qwenvl_train.model.source_config import (
    check_weight_sources,
    qwenvl_facts,
    resolve_model_sizes,
)
from qwenvl_train.model.weights import load_init_weights, load_llm, load_qwenvl, read_state_dict


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def _from_weights(**weights) -> QwenVLConfig:
    return resolve_model_sizes(QwenVLConfig(sizes="from_weights",
                                            weights=WeightsConfig(**weights)))


@torch.no_grad()
@pytest.mark.parametrize("width", [48, 64])  # 64: ViT width == adapter width (no kv_proj)
def test_import_export_import_is_bitwise(tmp_path, width):
    cfg = tiny_config(width=width)
    sd = released_ckpt(cfg, torch.Generator().manual_seed(7))
    if width == cfg.adapter.embed_dim:  # released: kv_proj is an Identity, not a tensor
        del sd["transformer.visual.attn_pool.kv_proj.weight"]
    save_released(tmp_path / "src", cfg, sd)
    first = build_model(cfg, 224).eval()
    load_init_weights(first, WeightsConfig(qwenvl=str(tmp_path / "src")))

    paths = export_model(first.state_dict(), cfg, tmp_path / "export", ["released"],
                         chat=True, image_size=448)
    out = paths["released"]
    written = read_state_dict(out)  # the export, in the released names, IS the source
    assert written.keys() == sd.keys()
    assert [k for k in sd if not torch.equal(written[k], sd[k])] == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)

    # ... and loads through the same path as a released download, bitwise, with the sizes
    # its config.json states.
    assert check_weight_sources(replace(cfg, weights=WeightsConfig(qwenvl=str(out)))) == []
    read_back = _from_weights(qwenvl=str(out))
    assert (read_back.vision, read_back.adapter, read_back.llm) == (cfg.vision, cfg.adapter,
                                                                  cfg.llm)
    second = build_model(read_back, 448).eval()
    load_init_weights(second, WeightsConfig(qwenvl=str(out)))
    _same_state(first, second)
    model, loaded_cfg = load_for_inference(out)
    _same_state(first, model)
    assert loaded_cfg.llm == cfg.llm and is_chat_export(out)


def test_released_config_is_the_released_one_for_qwenvl_7b(tmp_path):
    cfg7b = load_config(["model=qwenvl_7b"]).model
    ours = released_config(cfg7b, image_size=448, torch_dtype="bfloat16")
    skip = {"transformers_version"}  # ours names the installed transformers
    assert {k: v for k, v in ours.items() if k not in skip} == \
           {k: v for k, v in RELEASED_CHAT_CONFIG.items() if k not in skip}
    # Reading the released config.json gives exactly the qwenvl_7b sizes.
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_CHAT_CONFIG))
    facts = {f.key: f.value for f in qwenvl_facts(tmp_path)}
    assert facts["vision.mlp_dim"] == 8192 and facts["llm.intermediate_size"] == 11008
    assert facts["adapter.heads"] == 32 and facts["vision.pos_grid"] == 16
    read = _from_weights(qwenvl=str(tmp_path))
    assert (read.vision, read.adapter, read.llm) == (cfg7b.vision, cfg7b.adapter, cfg7b.llm)


def test_export_of_a_gqa_model_skips_the_released_layout(tmp_path, caplog):
    cfg = tiny_config()
    cfg.llm.num_kv_heads = 2
    model = build_model(cfg, 224)
    with caplog.at_level(logging.WARNING):
        paths = export_model(model.state_dict(), cfg, tmp_path, ["consolidated", "released"],
                             chat=False, image_size=224)
    assert set(paths) == {"consolidated"} and "num_kv_heads=2" in caplog.text
    with pytest.raises(ValueError, match="no GQA"):
        released_state_dict(model.state_dict(), cfg)


# ---- keys an importer does not know (issue 13 item 3) --------------------------------------
BUFFERS = ("transformer.h.0.attn.rotary_emb.inv_freq", "transformer.h.1.attn.masked_bias",
           "transformer.rotary_emb.inv_freq", "transformer.h.0.attn.bias")


@torch.no_grad()
def test_known_buffers_are_skipped_by_name(tmp_path, caplog):
    cfg = tiny_config()
    sd = released_ckpt(cfg, torch.Generator().manual_seed(3))
    reference = build_model(cfg, 224)
    save_released(tmp_path / "clean", cfg, sd)
    load_qwenvl(reference, tmp_path / "clean")
    extra = {**sd, **{k: torch.ones(4) for k in BUFFERS}}
    save_released(tmp_path / "buffers", cfg, extra)
    model = build_model(cfg, 224)
    with caplog.at_level(logging.INFO, logger="qwenvl_train.model.weights"):
        load_qwenvl(model, tmp_path / "buffers")
    _same_state(reference, model)
    assert "skipping 4 buffer(s) that hold no weights" in caplog.text
    assert "attn.masked_bias" in caplog.text and "rotary_emb.inv_freq" in caplog.text


@pytest.mark.parametrize("key", ["lm_head.bias", "transformer.h.0.attn.c_proj.bias",
                                 "transformer.visual.attn_pool.ln_post.weight",
                                 "transformer.wpe.weight"])
def test_unknown_released_keys_name_key_and_file(tmp_path, key):
    cfg = tiny_config()
    sd = released_ckpt(cfg, torch.Generator().manual_seed(3))
    sd[key] = torch.zeros(cfg.llm.vocab_size if key == "lm_head.bias" else 8)
    save_released(tmp_path, cfg, sd)
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"][key]
    with pytest.raises(ValueError, match="neither weights of this layout nor known buffers") as e:
        load_qwenvl(build_model(cfg, 224), tmp_path)
    assert f"{key} (in {tmp_path / shard})" in str(e.value)


def test_unknown_keys_of_an_hf_llm_dir_name_key_and_file(tmp_path, caplog):
    cfg = tiny_config()
    src = save_hf_qwen2(tmp_path / "qwen2", hidden=64, heads=4, kv_heads=4, tied=False,
                        vocab=cfg.llm.vocab_size)
    from safetensors.torch import load_file

    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older transformers
    save_file(sd, str(src / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="qwenvl_train.model.weights"):
        load_llm(build_model(cfg, 224), src)
    assert "skipping 1 buffer(s)" in caplog.text
    sd["score.weight"] = torch.zeros(2, 64)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"score\.weight \(in .*model\.safetensors\)"):
        load_llm(build_model(cfg, 224), src)
