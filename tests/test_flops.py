"""FLOPs: hand-computed tiny config, the 6N rule at 7B, the 3x/2x/1x stage composition,
and torch's FLOP counter on the real modules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch
from omegaconf import OmegaConf

from qwenvl_train.training.observe import flops as F

CONFIGS = Path(__file__).resolve().parents[1] / "qwenvl_train" / "configs"

# Tiny config, small enough to do by hand. Dataclass-like attribute access (SimpleNamespace).
TINY = NS(
    vision=NS(patch_size=14, width=8, layers=2, heads=2, mlp_dim=32, pos_grid=16),
    adapter=NS(num_queries=4, embed_dim=8, heads=2, post_group="vit"),
    llm=NS(hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=16,
           vocab_size=10),
)
IMAGE = 28  # n = (28 / 14)^2 = 4 ViT tokens

# ViT, n=4, w=8, m=32, p=14:
#   patch embed 2*4*(3*14*14)*8 = 37632
#   block: qkv 2*4*8*24 = 1536, scores 2*4*4*8 = 256, attn@V 256, out 2*4*8*8 = 512,
#          MLP 2*4*8*32*2 = 4096  -> 6656; two blocks 13312
VIT = 37632 + 2 * 6656  # 50944
# Adapter, n=4, w=8, Q=4, D=8:
#   kv_proj 2*4*8*8 = 512, q 2*4*8*8 = 512, k+v 2*2*4*8*8 = 1024, scores+attn@V
#   2*2*4*4*8 = 512, out 2*4*8*8 = 512 -> 3072; post (ln_post @ proj) 2*4*8*8 = 512
ADAPTER_ATTN, ADAPTER_POST = 3072, 512
# LLM layer per token at seq_len 6 (causal span 3), h=8, a=2, kv=1, d=4, i=16:
#   qkv 2*8*(8 + 2*4) = 256, scores+attn@V 2*2*3*8 = 96, o 2*8*8 = 128, MLP 3*2*8*16 = 768
LAYER = 256 + 96 + 128 + 768  # 1248
HEAD = 2 * 8 * 10  # 160


def test_tiny_config_by_hand() -> None:
    assert F.vit_flops(TINY.vision, IMAGE) == VIT
    assert F.adapter_flops(TINY, IMAGE) == ADAPTER_ATTN + ADAPTER_POST
    assert F.llm_layer_flops(TINY.llm, 6) == LAYER
    assert F.llm_flops(TINY.llm, 6) == 2 * LAYER + HEAD  # 2656
    # packed: the span comes from the segment length, not the row length
    assert F.llm_layer_flops(TINY.llm, 6, attn_span=1) == LAYER - 2 * 2 * 2 * 8


# A step of 2 rows x 6 tokens, 2 images, 5 loss positions:
FWD_VIT = 2 * VIT  # 101888
FWD_ADAPTER, FWD_POST = 2 * ADAPTER_ATTN, 2 * ADAPTER_POST  # 6144, 1024
FWD_LLM = 12 * 2 * LAYER + 5 * HEAD  # 29952 + 800 = 30752


@pytest.mark.parametrize(
    ("trainable", "post_group", "expected"),
    [
        # stage 1: ViT + adapter train (post in the vit group trains too); LLM frozen but
        # downstream of them -> 2x
        (["vit", "adapter"], "vit", 3 * (FWD_VIT + FWD_ADAPTER + FWD_POST) + 2 * FWD_LLM),
        # stage 2: everything 3x
        (["vit", "adapter", "llm"], "vit", 3 * (FWD_VIT + FWD_ADAPTER + FWD_POST + FWD_LLM)),
        # stage 3: frozen ViT before everything trained -> 1x; ln_post/proj frozen with the
        # ViT but behind the trained cross-attention -> 2x
        (["adapter", "llm"], "vit", FWD_VIT + 3 * FWD_ADAPTER + 2 * FWD_POST + 3 * FWD_LLM),
        (["adapter", "llm"], "adapter", FWD_VIT + 3 * (FWD_ADAPTER + FWD_POST + FWD_LLM)),
        # only the LLM trains: the whole vision path is forward-only
        (["llm"], "vit", FWD_VIT + FWD_ADAPTER + FWD_POST + 3 * FWD_LLM),
    ],
)
def test_step_composition(trainable: list[str], post_group: str, expected: int) -> None:
    cfg = NS(vision=TINY.vision, adapter=NS(**{**vars(TINY.adapter), "post_group": post_group}),
             llm=TINY.llm)
    got = F.step_flops(cfg, IMAGE, tokens=12, images=2, seq_len=6, trainable=trainable,
                       loss_tokens=5)
    assert got == expected


def test_packed_segment_len() -> None:
    assert F.effective_segment_len([2, 4]) == pytest.approx(20 / 6)
    # segment_len replaces the row length in the attention span only
    base = F.step_flops(TINY, IMAGE, 12, 0, seq_len=6, trainable=["llm"])
    packed = F.step_flops(TINY, IMAGE, 12, 0, seq_len=6, trainable=["llm"], segment_len=2)
    assert base - packed == 3 * 12 * 2 * (2 * 2 * (3 - 1) * 8)


def test_6n_rule_at_7b() -> None:
    cfg = OmegaConf.load(CONFIGS / "model" / "qwenvl_7b.yaml")
    llm = cfg.llm
    h, i, v, layers = llm.hidden_size, llm.intermediate_size, llm.vocab_size, llm.num_layers
    # matmul weights: q,k,v,o (kv_heads = heads) + gate, up, down per layer, plus lm_head;
    # the input embedding is a lookup and does no FLOPs
    n = layers * (4 * h * h + 3 * h * i) + h * v
    assert n == pytest.approx(7.10e9, rel=0.01)
    ratio = 3 * F.llm_flops(llm, 512) / (6 * n)
    assert 1.0 < ratio < 1.02  # attention adds ~1% at 512 tokens
    assert F.llm_flops(llm, 2048) / F.llm_flops(llm, 512) == pytest.approx(1.028, abs=0.005)


def test_peak_flops_table() -> None:
    assert F.peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert F.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert F.peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert F.peak_flops("NVIDIA H200", "bf16") == 989e12
    assert F.peak_flops("NVIDIA A10", "bf16") == 125e12
    assert F.peak_flops("NVIDIA A10G", "bf16") is None  # not an A10: unknown, no MFU
    assert F.peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert F.peak_flops("AMD Instinct MI300X", "bf16") == pytest.approx(1307.4e12)
    assert F.peak_flops("cpu", "fp32") is None
    assert F.peak_flops(torch.device("cpu"), "bf16", override_tflops=2.5) == 2.5e12
    with pytest.raises(ValueError, match="dtype"):
        F.peak_flops("NVIDIA A100", "int8")


def _counted(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math SDPA backend runs attention as matmuls, which the counter sees (full L x L).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_matches_flop_counter_on_real_modules() -> None:
    pytest.importorskip("einops")
    from qwenvl_train.model.adapter import Adapter
    from qwenvl_train.model.config import AdapterConfig, VisionConfig
    from qwenvl_train.model.vision import VisionTransformer

    vcfg = VisionConfig(width=32, layers=2, heads=4, mlp_dim=64)
    acfg = AdapterConfig(num_queries=16, embed_dim=48, heads=4)
    vit, adapter = VisionTransformer(vcfg), Adapter(acfg, kv_dim=32)
    images = torch.zeros(2, 3, 56, 56)
    feats = vit(images)
    cfg = NS(vision=vcfg, adapter=acfg)
    assert _counted(lambda: vit(images)) == 2 * F.vit_flops(vcfg, 56)
    assert _counted(lambda: adapter(feats)) == 2 * F.adapter_flops(cfg, 56)


def test_llm_matches_transformers_flop_counter() -> None:
    transformers = pytest.importorskip("transformers")
    llm = NS(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             vocab_size=300)
    hf = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=300, tie_word_embeddings=False,
    )
    hf._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(hf).eval()
    ids = torch.randint(0, 300, (2, 24))
    # The counter sees the full (masked) 24 x 24 scores, so compare with span = seq_len.
    assert _counted(lambda: model(input_ids=ids)) == 48 * F.llm_flops(llm, 24, attn_span=24)
