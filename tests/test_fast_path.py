"""The fast path on CPU: attention backends, the chunked LM-head loss, the speed switches,
bf16 details (fp32 tables and norm statistics) and the on-device image normalisation."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from model_helpers import sample_ids, tiny_config
from torch.nn.attention.flex_attention import create_block_mask

from qwenvl_train.model import vision as vision_mod
from qwenvl_train.model.adapter import sincos_2d
from qwenvl_train.model.attention import flex_block_mask
from qwenvl_train.model.loss import chunked_linear_cross_entropy
from qwenvl_train.model.qwenvl import build_model, restore_fp32_tables
from qwenvl_train.model.speed import compile_layers
from qwenvl_train.training.parallel.pipeline import pipe_inputs, pipeline_layers

Q = 16  # image slots of tiny_config()


def _diff(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    d = float((a - b).abs().max())
    print(f"[max abs diff] {name}: {d:.3e}")
    return d


def _packed_batch(lengths=((70, 1), (60, 2), (14, 0)), row_len=150, rows=2, seed=1):
    """`rows` rows, each the samples (length, images) packed + padding (segment 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, row_len), 151643)
    seg = torch.zeros(rows, row_len, dtype=torch.long)
    n_images = 0
    for r in range(rows):
        at = 0
        for s, (n, k) in enumerate(lengths[r:] + lengths[:r], start=1):
            ids[r, at:at + n] = sample_ids(n, k, Q, gen)
            seg[r, at:at + n] = s
            at, n_images = at + n, n_images + k
    labels = ids.clone()
    labels[(seg == 0) | (ids == 151859)] = -100
    images = torch.randn(n_images, 3, 224, 224, generator=gen)
    return {"input_ids": ids, "images": images, "labels": labels, "segment_ids": seg}


# ---- packed attention -------------------------------------------------------------------
def _random_segments(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    seg = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        at, s = 0, 1
        while at < length - 40:
            n = int(torch.randint(1, 300, (1,), generator=gen))
            seg[b, at:at + n], at, s = s, at + n, s + 1
    return seg


@pytest.mark.parametrize("length", [128, 300, 777])
def test_flex_block_mask_equals_create_block_mask(length):
    """The mask built from segment runs alone equals PyTorch's own construction (which
    evaluates the mask on every element), block for block, full and partial separately."""
    gen = torch.Generator().manual_seed(length)
    seg = _random_segments(3, length, gen)
    seg[0] = 1  # one sample filling the row

    def mask_mod(b, h, q, kv):
        return (seg[b, q] == seg[b, kv]) & (q >= kv)

    ours = flex_block_mask(seg)
    ref = create_block_mask(mask_mod, 3, None, length, length, device="cpu")

    def parts(bm) -> tuple[torch.Tensor, torch.Tensor]:
        full = bm.full_kv_num_blocks is not None
        dense_all = bm.to_dense()
        if not full:
            return dense_all, torch.zeros_like(dense_all)
        only_full = type(bm).from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices,
                                            BLOCK_SIZE=bm.BLOCK_SIZE, seq_lengths=bm.seq_lengths)
        return dense_all, only_full.to_dense()

    (ours_all, ours_full), (ref_all, ref_full) = parts(ours), parts(ref)
    assert torch.equal(ours_all, ref_all)
    assert torch.equal(ours_full, ref_full)
    # And the attention it gives is the dense-mask SDPA's.
    q, k, v = (torch.randn(3, 2, length, 8, generator=gen) for _ in range(3))
    from torch.nn.attention.flex_attention import flex_attention

    dense = (seg[:, :, None] == seg[:, None, :]) & torch.ones(length, length).tril().bool()
    assert _diff("flex vs sdpa", flex_attention(q, k, v, block_mask=ours),
                 F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])) < 1e-5


@torch.no_grad()
def test_attention_backends_equal_on_packed_rows_and_in_the_pipeline():
    """flex / sdpa / eager give the same logits and losses on packed rows (flex forward-only
    on CPU), and the pipeline's decoder layers -- which build the mask once per batch for
    all layers of a stage -- give the plain model's loss."""
    batch = _packed_batch()
    results = {}
    for attn in ("sdpa", "eager", "flex"):
        cfg = tiny_config()
        cfg.attn_implementation = attn
        torch.manual_seed(0)
        model = build_model(cfg, 224).eval()
        out = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        layers = pipeline_layers(model)
        x = pipe_inputs(batch)
        for layer in layers:
            x = layer(x)
        shared = layers[1].attention_inputs
        assert all(layer.attention_inputs is shared for layer in layers[1:-1])
        assert shared.builds == 1  # one mask for all decoder layers of the batch
        assert _diff(f"{attn} pipeline vs plain loss", x, out.loss) < 1e-6
        results[attn] = (out.loss, out.token_loss, logits)
    for attn in ("eager", "flex"):
        for i, name in enumerate(("loss", "token_loss", "logits")):
            assert _diff(f"{attn} vs sdpa {name}", results[attn][i], results["sdpa"][i]) < 2e-5


def test_flex_refuses_to_train_on_cpu():
    cfg = tiny_config()
    cfg.attn_implementation = "flex"
    model = build_model(cfg, 224).train()
    batch = _packed_batch(lengths=((20, 0), (20, 0)), row_len=48, rows=1)
    with pytest.raises(NotImplementedError, match="model.attn_implementation=flex"):
        model(**batch)


def test_vit_attention_gets_no_mask(monkeypatch):
    """All images of a batch have one size: the ViT calls SDPA without a mask (so SDPA may
    take its flash kernel)."""
    calls = []

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask, is_causal, kw))
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    functional = {n: getattr(F, n) for n in dir(F) if not n.startswith("__")}
    monkeypatch.setattr(vision_mod, "F", types.SimpleNamespace(
        **{**functional, "scaled_dot_product_attention": sdpa}))
    model = build_model(tiny_config(), 224)
    model.vit(torch.randn(2, 3, 224, 224))
    assert len(calls) == model.config.vision.layers
    assert all(mask is None and not causal and not kw for mask, causal, kw in calls)


# ---- the LM head and loss ---------------------------------------------------------------
@pytest.mark.parametrize(("chunk", "frozen_head"), [(1, False), (7, False), (64, False),
                                                    (7, True)])
def test_chunked_loss_equals_plain(chunk, frozen_head):
    gen = torch.Generator().manual_seed(chunk)
    n, hidden, vocab = 40, 16, 1000
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    t = torch.randint(0, vocab, (n,), generator=gen)
    grads = []
    for chunked in (False, True):
        h_, w_ = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen_head)
        if chunked:
            total, ce = chunked_linear_cross_entropy(h_, w_, t, chunk)
        else:
            ce = F.cross_entropy(F.linear(h_, w_), t, reduction="none")
            total = ce.sum()
        (total / n * 3.0).backward()  # an upstream gradient other than 1
        grads.append((total.detach(), ce.detach(), h_.grad, w_.grad))
    (t0, c0, gh0, gw0), (t1, c1, gh1, gw1) = grads
    assert _diff("sum", t1, t0) < 1e-4 and _diff("per token", c1, c0) < 1e-5
    assert _diff("grad hidden", gh1, gh0) < 1e-6
    assert gw1 is None if frozen_head else _diff("grad weight", gw1, gw0) < 1e-6


def test_chunked_loss_model_gradients_equal_plain():
    batch = _packed_batch()
    grads = []
    for chunked in ("false", "true"):
        cfg = tiny_config()
        cfg.chunked_loss = chunked
        torch.manual_seed(0)
        model = build_model(cfg, 224).train()
        assert model.chunked_loss == (chunked == "true")
        out = model(**batch)
        out.loss.backward()
        grads.append((out.loss.detach(), out.token_loss,
                      {n: p.grad for n, p in model.named_parameters()}))
    # Same fp32 math in another order: a few ulps of the ~11.9 loss (1 ulp = 9.5e-7).
    assert _diff("loss", grads[1][0], grads[0][0]) < 5e-6
    assert _diff("token_loss", grads[1][1], grads[0][1]) < 1e-5
    for name, g in grads[0][2].items():
        assert float((grads[1][2][name] - g).abs().max()) <= 1e-6 + 1e-5 * float(g.abs().max()), \
            name


# ---- speed switches ---------------------------------------------------------------------
def _loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_compile_layers_equal_losses_and_keep_names():
    """torch.compile of every ViT block and decoder layer (the test uses the aot_eager
    backend: the real capture and autograd tracing, without inductor's ~40 s CPU codegen;
    `model.compile=true` uses inductor). Names and parameters are unchanged."""
    batch = _packed_batch(lengths=((40, 1), (30, 0)), row_len=80, rows=1)
    torch.manual_seed(0)
    plain = build_model(tiny_config(), 224).train()
    torch.manual_seed(0)
    compiled = build_model(tiny_config(), 224).train()
    names = [n for n, _ in compiled.named_parameters()]
    layers = compile_layers(compiled, backend="aot_eager")
    assert len(layers) == 4 and [n for n, _ in compiled.named_parameters()] == names
    (l0, g0), (l1, g1) = _loss_and_grads(plain, batch), _loss_and_grads(compiled, batch)
    assert _diff("compiled loss", l1, l0) < 1e-5 and _diff("compiled grads", g1, g0) < 1e-5
    cfg = tiny_config()
    cfg.compile = True  # the config key wraps each layer's forward (not run here)
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable")
               for layer in [*build_model(cfg, 224).vit.blocks])


def test_selective_checkpointing_recomputes_every_kth_layer_with_equal_grads():
    batch = _packed_batch(lengths=((40, 1), (30, 0)), row_len=80, rows=1)
    results, forwards = [], {}
    for every in (None, 2, 1):
        cfg = tiny_config()
        cfg.llm.num_layers = cfg.vision.layers = 4
        gc = cfg.gradient_checkpointing
        gc.vit = gc.llm = every is not None
        gc.vit_every = gc.llm_every = every or 1
        torch.manual_seed(0)
        model = build_model(cfg, 224).train()
        calls = forwards[every] = {f"{part}{i}": 0 for part in ("vit", "llm") for i in range(4)}
        for part, layers in (("vit", model.vit.blocks), ("llm", model.llm.model.layers)):
            for i, layer in enumerate(layers):
                layer.mlp.register_forward_pre_hook(
                    lambda module, args, key=f"{part}{i}", calls=calls: calls.update(
                        {key: calls[key] + 1}))
        results.append(_loss_and_grads(model, batch))
    # Recomputed layers run their forward twice (forward + the backward's replay).
    assert set(forwards[None].values()) == {1}
    assert forwards[2] == {k: 2 if int(k[-1]) % 2 == 0 else 1 for k in forwards[2]}
    assert set(forwards[1].values()) == {2}
    for (loss, grads), name in zip(results[1:], ("every 2nd", "every"), strict=True):
        assert _diff(f"{name} layer: loss", loss, results[0][0]) == 0.0
        assert _diff(f"{name} layer: grads", grads, results[0][1]) < 1e-7


# ---- bf16 details -----------------------------------------------------------------------
def test_tables_back_to_fp32_after_a_bf16_cast():
    """A blanket bf16 cast (zero.Init under bf16, older DeepSpeed) rounds the sin-cos and
    rotary tables; restore_fp32_tables recomputes them exactly."""
    model = build_model(tiny_config(), 224)
    pos = model.adapter.pos_embed.clone()
    inv = model.llm.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.adapter.pos_embed.dtype == torch.bfloat16
    restore_fp32_tables(model)
    assert model.adapter.pos_embed.dtype == torch.float32
    assert torch.equal(model.adapter.pos_embed, pos)
    assert torch.equal(model.llm.model.rotary_emb.inv_freq, inv)
    assert torch.equal(pos, sincos_2d(pos.shape[1], 4))
    assert "adapter.pos_embed" in model.state_dict()  # still a persistent buffer


def test_layer_norm_statistics_are_fp32_for_bf16_inputs():
    """The model's LayerNorm on bf16 = fp32 normalisation rounded once (the CPU kernel
    alone keeps bf16 statistics and differs)."""
    ln = vision_mod.LayerNorm(256, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ln = ln.bfloat16()
    x = (torch.randn(32, 256) * 3 + 1).bfloat16()
    ref = F.layer_norm(x.float(), (256,), ln.weight.float(), ln.bias.float(), 1e-6).bfloat16()
    assert torch.equal(ln(x), ref)


# ---- the DeepSpeed config ---------------------------------------------------------------
def test_deepspeed_config_bf16_on_cpu_accumulation_dtype_and_overlap():
    from qwenvl_train.config import load_config
    from qwenvl_train.training.parallel.engine import deepspeed_config

    cfg = load_config(["parallel=zero2", "scale=demo", "stage.precision=bf16"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["bf16"] == {"enabled": True} and not ds["fp16"]["enabled"]  # CPU included
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"]["overlap_comm"] is True
    cfg = load_config(["parallel=zero3", "parallel.grad_accum_dtype=bf16",
                       "stage.precision=bf16"])
    ds = deepspeed_config(cfg, dp_size=1)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "overlap_comm" not in ds["zero_optimization"]  # ZeRO-3 keeps DeepSpeed's default
    ds = deepspeed_config(load_config(["scale=demo"]), dp_size=1)  # the CPU demo: fp32
    assert ds["bf16"] == {"enabled": False} and "data_types" not in ds


@pytest.mark.parametrize(("overrides", "key"), [
    (["parallel.zero_stage=0", "parallel.grad_accum_dtype=fp32", "stage.precision=bf16"],
     "parallel.grad_accum_dtype"),
    (["stage.precision=fp16"], "stage.precision"),
    (["model.attn_implementation=flex"], "model.attn_implementation"),
])
def test_unsupported_precision_or_kernel_is_refused_naming_the_key(overrides, key):
    from qwenvl_train.config import ConfigError, load_config
    from qwenvl_train.training.parallel.engine import check_device_support

    if torch.cuda.is_available() and key != "parallel.grad_accum_dtype":
        pytest.skip("allowed on a GPU")
    cfg = load_config(overrides)
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        check_device_support(cfg)


@pytest.mark.parametrize(("override", "key"), [
    ("parallel.grad_accum_dtype=fp16", "parallel.grad_accum_dtype"),
    ("+parallel.deepspeed.data_types={grad_accum_dtype:bf16}",
     "parallel.deepspeed.data_types.grad_accum_dtype"),
    ("model.chunked_loss=maybe", "model.chunked_loss"),
    ("model.gradient_checkpointing.llm_every=0", "model.gradient_checkpointing.llm_every"),
])
def test_new_keys_are_validated(override, key):
    from qwenvl_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config([override])


def test_fused_adamw_trains_like_the_multi_tensor_one():
    """parallel.fused_adamw: the same AdamW update (weight decay, per-group LR) in one
    kernel; losses agree to rounding over a few steps."""
    from qwenvl_train.training.optim import build_optimizer, build_param_groups

    batch = _packed_batch(lengths=((40, 1), (30, 0)), row_len=80, rows=1)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_config(), 224).train()
        groups, _ = build_param_groups(model, weight_decay=0.05, group_lr_scale={"llm": 0.5},
                                       vit_layer_decay=0.9, num_vit_layers=2)
        opt = build_optimizer(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        assert opt.defaults["fused"] is (True if fused else None)
        losses = []
        for _ in range(4):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        runs.append(torch.stack(losses))
    assert runs[0][-1] < runs[0][0]
    assert _diff("fused vs multi-tensor AdamW losses", runs[1], runs[0]) < 1e-5
