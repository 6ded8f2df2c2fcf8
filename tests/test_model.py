"""The model on tiny sizes: config schema, forward contract, packing, text-only batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import sample_ids, tiny_config
from omegaconf import OmegaConf

from qwenvl_train.model.attention import block_causal_mask, positions_from_segments, varlen_kwargs
from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.model.groups import count_by_group, group_of, set_trainable
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.model.vision import resize_pos_table

CONFIGS = Path(__file__).resolve().parents[1] / "qwenvl_train" / "configs" / "model"


def _report(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    diff = (a - b).abs().max().item()
    print(f"[max abs diff] {name}: {diff:.3e}")
    assert diff < tol, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("name", ["tiny", "qwenvl_7b"])
def test_yaml_configs_load_into_schema(name):
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(QwenVLConfig), raw)
    cfg = QwenVLConfig.from_dict(merged)
    cfg.validate()
    assert cfg.to_dict() == OmegaConf.to_container(merged)


@pytest.mark.parametrize(("path", "value", "key"), [
    ("vision.heads", 5, "model.vision.heads"),
    ("llm.num_heads", 3, "model.llm.num_heads"),
    ("llm.num_kv_heads", 3, "model.llm.num_kv_heads"),
    ("adapter.num_queries", 60, "model.adapter.num_queries"),
    ("adapter.post_group", "llm", "model.adapter.post_group"),
    ("attn_implementation", "flash", "model.attn_implementation"),
    ("adapter.embed_dim", 32, "model.adapter.embed_dim"),
    ("vision.extra", 1, "model.vision.extra"),
])
def test_validate_names_the_key(path, value, key):
    d = tiny_config().to_dict()
    node = d
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=rf"^{key}: "):
        QwenVLConfig.from_dict(d).validate()


def test_pos_table_resize_matches_interpolate():
    table = torch.randn(256, 24)
    grid = table.reshape(1, 16, 16, 24).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    _report("pos table 16x16 -> 32x32", resize_pos_table(table, 1024),
            ref.permute(0, 2, 3, 1).reshape(1024, 24), 1e-7)
    assert resize_pos_table(table, 256) is table


def test_names_follow_group_registry_and_pos_embed_is_a_buffer():
    model = build_model(tiny_config(), 224)
    names = [n for n, _ in model.named_parameters()]
    assert all(group_of(n) in ("vit", "adapter", "llm") for n in names)
    assert "adapter.pos_embed" not in names and "adapter.pos_embed" in model.state_dict()
    for n in ("vit.conv1.weight", "vit.positional_embedding", "vit.blocks.1.attn.in_proj.weight",
              "adapter.query", "adapter.kv_proj.weight", "adapter.attn.in_proj_weight",
              "adapter.attn.out_proj.weight", "adapter.proj", "adapter.ln_post.weight"):
        assert n in names, n
    set_trainable(model, ["adapter"])
    counts = count_by_group(model)
    assert counts["adapter"].trainable > 0 and counts["vit"].trainable == 0
    assert not model.adapter.pos_embed.requires_grad


def test_images_slots_mismatch_raises():
    cfg = tiny_config()
    model = build_model(cfg, 224)
    ids = sample_ids(60, 2, cfg.adapter.num_queries, torch.Generator().manual_seed(0))[None]
    with pytest.raises(ValueError, match=r"32 <imgpad> tokens but 1 images x 16 slots = 16"):
        model(ids, torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"32 <imgpad> tokens but 0 images"):
        model(ids, torch.zeros(0, 3, 224, 224))


def _pack(samples, length):
    """Pack (ids, labels) samples into one row; pads continue counting their positions."""
    ids = torch.full((length,), 151643)
    labels = torch.full((length,), -100)
    seg = torch.zeros(length, dtype=torch.long)
    pos = torch.arange(length)
    at = 0
    for i, (s_ids, s_labels) in enumerate(samples, start=1):
        n = len(s_ids)
        ids[at:at + n], labels[at:at + n], seg[at:at + n] = s_ids, s_labels, i
        pos[at:at + n] = torch.arange(n)
        at += n
    pos[at:] = torch.arange(length - at) + (pos[at - 1] + 1)
    return ids, labels, seg, pos


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_rows_equal_samples_one_by_one(attn):
    cfg = tiny_config()
    cfg.attn_implementation = attn
    q = cfg.adapter.num_queries
    torch.manual_seed(0)
    model = build_model(cfg, 224).eval()
    gen = torch.Generator().manual_seed(1)
    lengths, n_images = [30, 45, 22, 50], [1, 2, 0, 1]
    samples = []
    for n, k in zip(lengths, n_images, strict=True):
        ids = sample_ids(n, k, q, gen)
        labels = ids.clone()
        labels[:3] = -100
        labels[ids == 151859] = -100
        samples.append((ids, labels, torch.randn(k, 3, 224, 224, generator=gen)))
    rows = [_pack([s[:2] for s in samples[:2]], 84), _pack([s[:2] for s in samples[2:]], 84)]
    ids, labels, seg, pos = (torch.stack(t) for t in zip(*rows, strict=True))
    images = torch.cat([s[2] for s in samples])
    packed = model(ids, images, position_ids=pos, segment_ids=seg).logits
    packed_loss = model(ids, images, labels=labels, position_ids=pos, segment_ids=seg)
    worst, starts = 0.0, [0, 30, 0, 22]
    for i, (s_ids, s_labels, s_images) in enumerate(samples):
        row, at, n = i // 2, starts[i], len(s_ids)
        alone = model(s_ids[None], s_images).logits[0]
        worst = max(worst, (packed[row, at:at + n] - alone).abs().max().item())
        alone_loss = model(s_ids[None], s_images, labels=s_labels[None]).token_loss[0]
        _report(f"{attn} packed token_loss sample {i}", packed_loss.token_loss[row, at:at + n],
                alone_loss, 1e-5)
    print(f"[max abs diff] {attn} packed logits vs one by one: {worst:.3e}")
    assert worst < 1e-5


def test_loss_matches_full_logits_and_contract():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg, 224).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.stack([sample_ids(40, 1, 16, gen), sample_ids(40, 1, 16, gen, start=5)])
    labels = ids.clone()
    labels[:, :8] = -100
    images = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        full = model(ids, images).logits
        out = model(ids, images, labels=labels)
    assert out.logits is None and out.loss.ndim == 0 and out.token_loss.shape == (2, 40)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1))
    _report("label-only loss vs full-logits CE", out.loss, ref, 1e-5)
    assert (out.token_loss[labels == -100] == 0).all()


def test_text_only_batch_gives_zero_grads_to_vision():
    cfg = tiny_config()
    model = build_model(cfg, 224)
    ids = torch.randint(0, 5000, (2, 24))
    out = model(ids, torch.zeros(0, 3, 224, 224), labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("vit.", "adapter.")):
            assert p.grad is not None, name
            assert torch.count_nonzero(p.grad) == 0, name
    assert model.llm.lm_head.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_grads():
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(3)
    ids = sample_ids(40, 1, 16, gen)[None]
    images = torch.randn(1, 3, 224, 224, generator=gen)
    grads = []
    for ckpt in (False, True):
        cfg.gradient_checkpointing.vit = cfg.gradient_checkpointing.llm = ckpt
        torch.manual_seed(0)
        model = build_model(cfg, 224).train()
        model(ids, images, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    _report("grads with vs without checkpointing", grads[0], grads[1], 1e-6)


def test_positions_from_segments():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1]]


def test_varlen_kwargs_match_segments():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    kw = varlen_kwargs(seg)
    assert kw["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 10, 12] and kw["max_length_q"] == 4
    mask = block_causal_mask(seg)[:, 0]
    flat = torch.block_diag(*[torch.ones(n, n).tril() for n in kw["cu_seq_lens_q"].diff()])
    assert torch.equal(torch.block_diag(mask[0], mask[1]).float(), flat)
