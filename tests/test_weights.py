"""Weight import from the real released layouts, and the consolidated export round trip.

Each import is checked against an independent reference of the source model's computation
(tests/model_helpers.py). Max abs diffs are printed (run with -s to see them)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_helpers import (
    qwen_v1_ckpt,
    ref_openclip_trunk,
    ref_qwen_v1_logits,
    ref_released_visual,
    released_ckpt,
    released_sincos,
    sample_ids,
    tiny_config,
    vit_trunk_ckpt,
)
from safetensors.torch import save_file
from transformers import Qwen2ForCausalLM

from qwenvl_train.model.config import WeightsConfig
from qwenvl_train.model.qwenvl import build_model, qwen2_config
from qwenvl_train.model.weights import (
    export_consolidated,
    load_consolidated,
    load_init_weights,
    load_llm,
    load_qwenvl,
)


def _report(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    diff = (a - b).abs().max().item()
    print(f"[max abs diff] {name}: {diff:.3e}")
    assert diff < tol, f"{name}: max abs diff {diff}"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_openclip_vit_import(tmp_path):
    cfg = tiny_config()
    gen = _gen(1)
    sd = {f"visual.{k}": v for k, v in vit_trunk_ckpt(cfg, gen, openclip=True).items()}
    sd["token_embedding.weight"] = torch.randn(10, 8)  # text tower keys are ignored
    sd["logit_scale"] = torch.ones(())
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    model = build_model(cfg, 224).eval()
    load_init_weights(model, WeightsConfig(vit=str(tmp_path)))
    for size in (224, 448):  # 448 also checks the bicubic 16x16 -> 32x32 position resize
        images = torch.randn(2, 3, size, size, generator=gen)
        ref = ref_openclip_trunk(sd, images, cfg.vision.heads, cfg.vision.layers)
        _report(f"OpenCLIP ViT trunk @{size}", model.vit(images), ref, 1e-5)


@torch.no_grad()
def test_hf_qwen2_dir_import_extends_vocab(tmp_path):
    cfg = tiny_config()
    src_cfg = qwen2_config(cfg.llm)
    src_cfg.vocab_size = 151646  # a plain Qwen2 vocab: no Qwen-VL special tokens
    torch.manual_seed(0)
    src = Qwen2ForCausalLM(src_cfg).eval()
    src.save_pretrained(tmp_path / "qwen2")
    model = build_model(cfg, 224).eval()
    load_llm(model, tmp_path / "qwen2")
    ids = torch.randint(0, 151646, (2, 12))
    ours = model.llm(input_ids=ids).logits
    _report("HF Qwen2 dir -> llm logits", ours[..., :151646], src(input_ids=ids).logits, 1e-5)
    emb = model.llm.get_input_embeddings().weight
    mean = src.get_input_embeddings().weight.mean(0)
    _report("new vocab rows = mean row", emb[151859], mean, 1e-6)
    assert emb.shape[0] == cfg.llm.vocab_size


@torch.no_grad()
def test_qwen_v1_llm_import_sharded(tmp_path):
    cfg = tiny_config()
    sd = qwen_v1_ckpt(cfg, _gen(2))
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: sd[k].contiguous() for k in names}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = build_model(cfg, 224).eval()
    load_llm(model, tmp_path)
    ids = torch.randint(0, 151936, (2, 20), generator=_gen(3))
    ref = ref_qwen_v1_logits(sd, cfg, sd["transformer.wte.weight"][ids])
    _report("Qwen v1 -> Qwen2 logits", model.llm(input_ids=ids).logits, ref, 1e-4)


@torch.no_grad()
def test_released_qwenvl_import(tmp_path):
    cfg = tiny_config()
    gen = _gen(4)
    sd = released_ckpt(cfg, gen)
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
              "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: sd[k] for k in names}, tmp_path / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model = build_model(cfg, 448).eval()
    load_qwenvl(model, tmp_path)
    # The stored sin-cos table is the released one (our generator matches it too).
    _report("adapter sin-cos table vs released numpy",
            model.adapter.pos_embed, torch.from_numpy(released_sincos(64, 4)), 1e-6)
    for size in (224, 448):
        images = torch.randn(2, 3, size, size, generator=gen)
        ref = ref_released_visual(sd, images, cfg)
        _report(f"released visual @{size}", model.encode_images(images), ref, 1e-5)
    # End to end: image features replace the <imgpad> embeddings, then the v1 decoder.
    q = cfg.adapter.num_queries
    ids = torch.stack([sample_ids(48, 1, q, gen), sample_ids(48, 1, q, gen, start=9)])
    images = torch.randn(2, 3, 448, 448, generator=gen)
    embeds = sd["transformer.wte.weight"][ids].clone()
    embeds[ids == 151859] = ref_released_visual(sd, images, cfg).reshape(-1, cfg.llm.hidden_size)
    ref = ref_qwen_v1_logits(sd, cfg, embeds)
    _report("released Qwen-VL end-to-end logits", model(ids, images).logits, ref, 1e-4)


def test_import_mismatch_is_clear(tmp_path):
    cfg = tiny_config()
    sd = released_ckpt(cfg, _gen(5))
    save_file(sd, str(tmp_path / "full.safetensors"))
    with pytest.raises(ValueError, match=r"positional_embedding has shape \(256, 48\) in the"):
        load_qwenvl(build_model(tiny_config(width=32), 224), tmp_path / "full.safetensors")
    del sd["transformer.visual.ln_pre.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*ln_pre.weight"):
        load_qwenvl(build_model(cfg, 224), tmp_path)


@torch.no_grad()
def test_export_then_load_at_another_image_size(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    src = build_model(cfg, 224).eval()
    out = export_consolidated(src, cfg, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "llm" / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["vision"]["width"] == cfg.vision.width
    torch.manual_seed(1)
    dst = build_model(cfg, 448).eval()
    load_consolidated(dst, out)
    gen = _gen(6)
    ids = sample_ids(40, 1, cfg.adapter.num_queries, gen)[None]
    images = torch.randn(1, 3, 448, 448, generator=gen)
    _report("export 224 -> load at 448, logits", dst(ids, images).logits,
            src(ids, images).logits, 0.0 + 1e-7)
    llm = Qwen2ForCausalLM.from_pretrained(out / "llm").eval()
    _report("exported llm/ dir logits", llm(input_ids=ids).logits,
            src.llm(input_ids=ids).logits, 1e-7)
    # Strict: a model of another shape refuses the export with a clear error.
    with pytest.raises(ValueError, match="model.vision differs"):
        load_consolidated(build_model(tiny_config(width=64), 224), out)


@pytest.mark.slow
def test_zero3_init_import_and_train(torchrun, tmp_path):
    """Build under deepspeed.zero.Init (2 ranks), import released weights into partitioned
    parameters, match the reference forward, and take a text-only step."""
    cfg = tiny_config()
    save_file(released_ckpt(cfg, _gen(4)), str(tmp_path / "model.safetensors"))
    proc = torchrun(["tests/workers/model_zero3_worker.py", str(tmp_path),
                     str(tmp_path / "out.json")], nproc=2, check=False)
    assert proc.returncode == 0, proc.output[-3000:]
    res = json.loads((tmp_path / "out.json").read_text())
    print(f"[max abs diff] ZeRO-3 (zero.Init) released import vs reference: {res['diff']:.3e}")
    assert res["partitioned"] and res["diff"] < 1e-4 and math.isfinite(res["loss"])
