"""Bring your own weights (issue 13 items 1, 2, 4): every source's config is read before the
model is built; sizes come from it (`model.sizes=from_weights`) or a mismatch is refused in
one message naming every override; a frozen part no weights reach is warned about."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from model_helpers import tiny_config
from safetensors.torch import load_file
from source_helpers import RELEASED_CHAT_CONFIG, save_hf_qwen2, save_openclip
from trainer_helpers import TRAIN, export_state, overrides, split_by_group

from qwenvl_train.config import ConfigError, load_config
from qwenvl_train.model.config import QwenVLConfig, WeightsConfig
from qwenvl_train.model.source_config import (
    check_weight_sources,
    frozen_random_parts,
    openclip_facts,
    resolve_model_sizes,
)


def _cfg(**weights) -> QwenVLConfig:
    cfg = tiny_config()
    cfg.weights = WeightsConfig(**weights)
    return cfg


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Qwen2 dirs (hidden 64, tied, a plain 151,646 vocab; GQA 4/2 and 4/4) and an OpenCLIP
    ViT (width 48) with and without open_clip_config.json."""
    root = tmp_path_factory.mktemp("sources")
    vit_cfg = tiny_config(width=48, vit_heads=4)
    return {"qwen2": save_hf_qwen2(root / "qwen2"),
            "qwen2_mha": save_hf_qwen2(root / "qwen2_mha", kv_heads=4),  # no GQA: the released
            # Qwen v1 layout fuses Q, K, V of equal width
            "clip": save_openclip(root / "clip", vit_cfg, with_config=True),
            "clip_bare": save_openclip(root / "clip_bare", vit_cfg, with_config=False)}


def test_explicit_sizes_that_differ_are_listed_with_their_overrides(sources):
    cfg = _cfg(llm=str(sources["qwen2"]), vit=str(sources["clip"]))
    cfg.llm.num_kv_heads, cfg.llm.intermediate_size = 4, 128
    cfg.vision.width, cfg.vision.heads, cfg.vision.mlp_dim = 64, 4, 256
    problems = check_weight_sources(cfg)
    qwen2, clip = sources["qwen2"] / "config.json", sources["clip"] / "open_clip_config.json"
    assert sorted(problems) == sorted([
        f"model.llm.num_kv_heads=2 ({qwen2}: num_key_value_heads=2; yours: 4)",
        f"model.llm.intermediate_size=96 ({qwen2}: intermediate_size=96; yours: 128)",
        f"model.vision.width=48 ({clip}: vision_cfg.width=48; yours: 64)",
        f"model.vision.mlp_dim=192 ({clip}: int(vision_cfg.width x mlp_ratio) = int(48 x 4.0);"
        " yours: 256)",
    ])  # vocab (import fits it) and the tied source (loads into an untied head) pass


def test_sizes_from_the_weights(sources):
    given = replace(_cfg(llm=str(sources["qwen2"]), vit=str(sources["clip"])),
                    sizes="from_weights")
    cfg = resolve_model_sizes(given)
    assert (cfg.llm.hidden_size, cfg.llm.num_heads, cfg.llm.num_kv_heads) == (64, 4, 2)
    assert cfg.llm.vocab_size == 151936  # the plain Qwen2 vocab grows by the Qwen-VL tokens
    assert cfg.llm.tie_word_embeddings and cfg.adapter.embed_dim == 64
    assert (cfg.vision.width, cfg.vision.heads, cfg.vision.mlp_dim) == (48, 4, 192)
    assert check_weight_sources(cfg) == [] and cfg.sizes == "config"


def test_openclip_sizes_from_tensor_shapes(sources):
    facts = {f.key: f.value for f in openclip_facts(sources["clip_bare"])}
    assert facts == {"vision.width": 48, "vision.patch_size": 14, "vision.layers": 2,
                     "vision.mlp_dim": 192, "vision.pos_grid": 16}  # heads: not in shapes


def test_unreadable_and_unsupported_sources_are_problems(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    problems = check_weight_sources(_cfg(llm=str(tmp_path / "llama"),
                                         vit=str(tmp_path / "missing.bin")))
    assert any("model_type 'llama'" in p and "'qwen2'" in p for p in problems)
    assert f"model.weights.vit={tmp_path / 'missing.bin'}: no such file or directory" in problems
    with pytest.raises(ConfigError, match="no weight source"):
        load_config(["model=from_weights"])


def test_frozen_parts_no_weights_reach():
    cfg = tiny_config()
    assert frozen_random_parts(cfg, ["adapter", "llm"]) == ["vit", "adapter_post"]
    cfg.weights = WeightsConfig(vit="clip.bin", llm="qwen2")
    assert frozen_random_parts(cfg, ["adapter", "llm"]) == ["adapter_post"]
    cfg.adapter.post_group = "adapter"  # ln_post/proj then train with the adapter
    assert frozen_random_parts(cfg, ["adapter", "llm"]) == []
    assert frozen_random_parts(tiny_config(), ["vit", "adapter"]) == ["llm"]
    assert frozen_random_parts(tiny_config(), ["adapter", "llm"], init_from="run") == []


# ---- at the command line -----------------------------------------------------------------
def test_cli_refuses_a_mismatch_in_one_message_before_building(run_cli, sources, tmp_path):
    start = time.perf_counter()
    proc = run_cli(TRAIN[1], ["model=tiny", f"model.weights.llm={sources['qwen2']}",
                              f"model.weights.vit={sources['clip']}", f"run_dir={tmp_path}/run",
                              "tracking=none"], timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    for line in ("model.llm.num_kv_heads=2", "model.llm.intermediate_size=96",
                 "model.vision.width=48", "model.vision.mlp_dim=192", "model.sizes=from_weights"):
        assert line in err
    assert err.count("invalid config") == 1 and "Traceback" not in err
    run = tmp_path / "run"  # refused before the run wrote anything (Hydra's own log aside)
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()
    print(f"[cli] mismatch refused in {elapsed:.1f} s")


def test_readme_finetune_command_names_the_fix(run_cli, tmp_path):
    """README: `model.weights.qwenvl=DIR stage=sft` on the tiny default model names every
    size of the released 7B; with `model=qwenvl_7b` the preflight passes."""
    released = tmp_path / "Qwen-VL-Chat"
    released.mkdir()
    (released / "config.json").write_text(json.dumps(RELEASED_CHAT_CONFIG))
    proc = run_cli(TRAIN[1], [f"model.weights.qwenvl={released}", "stage=sft",
                              f"run_dir={tmp_path}/run", "tracking=none"], timeout=120)
    assert proc.returncode == 2
    for line in ("model.vision.width=1664", "model.llm.hidden_size=4096",
                 "model.adapter.num_queries=256", "model.llm.intermediate_size=11008",
                 "model=qwenvl_7b"):
        assert line in proc.stderr
    cfg = load_config([f"model.weights.qwenvl={released}", "stage=sft", "model=qwenvl_7b"])
    assert cfg.model.vision.width == 1664
    assert load_config([f"model.weights.qwenvl={released}", "stage=sft",
                        "model=from_weights"]).model.llm.num_layers == 32


ALL_FORMATS = "export.formats=[consolidated,released,hf_llm]"


def _run(run_dir, demo_data, *extra):
    """The tiny-run overrides with the model from the weights (no `model=tiny`)."""
    args = overrides(run_dir, demo_data, "model=from_weights",
                     "model.gradient_checkpointing.vit=false",
                     "model.gradient_checkpointing.llm=false", "stage.image_size=224", *extra,
                     steps=1, stage="sft")
    return [{"stage.optim.warmup_steps=2": "stage.optim.warmup_steps=1"}.get(a, a)
            for a in args if a != "model=tiny"]


@pytest.mark.slow
def test_own_weights_to_released_export_and_back(run_cli, sources, demo_data, tmp_path):
    """Stage sft from an HF Qwen2 dir + an OpenCLIP ViT with model=from_weights: it trains,
    warns that ln_post/proj are frozen and random, and exports every format; a second run
    imports export/released through model.weights.qwenvl (ViT frozen: bitwise the same)."""
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_cli(TRAIN[1], _run(first, demo_data, f"model.weights.llm={sources['qwen2_mha']}",
                                  f"model.weights.vit={sources['clip']}", ALL_FORMATS))
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert "model sizes from the weights" in log
    assert log.count("frozen part(s) adapter_post were never loaded from any weights: they "
                     "stay RANDOM") == 2  # at the start and in the run summary
    summary = json.loads((first / "summary.json").read_text())
    assert summary["random_frozen_parts"] == ["adapter_post"]
    for fmt, sub in (("consolidated", "export"), ("released", "export/released"),
                     ("hf_llm", "export/llm")):
        assert f"export {fmt:<12} -> {first / sub}" in log
        assert summary["exports"][fmt] == str(first / sub)
    vit = load_file(str(sources["clip"] / "open_clip_model.safetensors"))
    exported = export_state(first)
    assert torch.equal(exported["vit.conv1.weight"], vit["visual.conv1.weight"])  # frozen

    proc = run_cli(TRAIN[1], _run(second, demo_data,
                                  f"model.weights.qwenvl={first / 'export' / 'released'}",
                                  "export.formats=[consolidated]"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RANDOM" not in proc.stderr
    assert json.loads((second / "summary.json").read_text())["random_frozen_parts"] == []
    assert not (second / "export" / "released").exists()
    a, b = split_by_group(exported), split_by_group(export_state(second))
    assert [k for k in a["vit"] if not torch.equal(a["vit"][k], b["vit"][k])] == []
