import math

import pytest
import torch
from torch import nn

from qwenvl_train.model.groups import count_by_group, group_of, set_trainable, skips_weight_decay
from qwenvl_train.training.optim import (
    Schedule,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    skipped_update,
)


def test_cosine_schedule_values():
    s = Schedule(peak=2e-4, floor=1e-6, warmup_steps=500, total_steps=50000)
    assert s.lr(0) == pytest.approx(2e-4 / 500)
    assert s.lr(249) == pytest.approx(1e-4)
    assert s.lr(499) == pytest.approx(2e-4)          # end of warmup: peak
    assert s.lr(500) == pytest.approx(2e-4)          # cosine starts at the peak
    mid = 500 + (50000 - 500) // 2                   # half-way: the mean of peak and floor
    assert s.lr(mid) == pytest.approx((2e-4 + 1e-6) / 2)
    quarter = 500 + (50000 - 500) // 4
    assert s.lr(quarter) == pytest.approx(1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr(50000) == pytest.approx(1e-6)        # floor
    assert s.lr(60000) == pytest.approx(1e-6)


class _Toy(nn.Module):
    """Parameter names of the QwenVL layout with 3 ViT blocks."""

    def __init__(self):
        super().__init__()
        self.vit = nn.Module()
        self.vit.conv1 = nn.Conv2d(3, 4, 2, bias=False)
        self.vit.positional_embedding = nn.Parameter(torch.zeros(4, 4))
        self.vit.ln_pre = nn.LayerNorm(4)
        self.vit.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.adapter = nn.Module()
        self.adapter.query = nn.Parameter(torch.zeros(2, 4))
        self.adapter.kv_proj = nn.Linear(4, 4, bias=False)
        self.adapter.ln_post = nn.LayerNorm(4)
        self.adapter.proj = nn.Parameter(torch.zeros(4, 4))
        self.llm = nn.Linear(4, 4)


def test_layer_decay_per_vit_block():
    model = _Toy()
    groups, _ = build_param_groups(model, weight_decay=0.05, group_lr_scale={},
                                   vit_layer_decay=0.95, num_vit_layers=3)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    # depth: embeddings 0, block i -> i+1, post (ln_post/proj in the vit group) -> 4
    assert scale_of[id(model.vit.conv1.weight)] == pytest.approx(0.95 ** 4)
    assert scale_of[id(model.vit.blocks[0].weight)] == pytest.approx(0.95 ** 3)
    assert scale_of[id(model.vit.blocks[1].weight)] == pytest.approx(0.95 ** 2)
    assert scale_of[id(model.vit.blocks[2].weight)] == pytest.approx(0.95)
    assert scale_of[id(model.adapter.proj)] == pytest.approx(1.0)
    assert scale_of[id(model.adapter.kv_proj.weight)] == 1.0
    assert scale_of[id(model.llm.weight)] == 1.0


def test_weight_decay_exclusions():
    model = _Toy()
    groups, _ = build_param_groups(model, weight_decay=0.05, group_lr_scale={},
                                   vit_layer_decay=1.0, num_vit_layers=3)
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    no_decay = [model.vit.positional_embedding, model.vit.ln_pre.weight, model.vit.ln_pre.bias,
                model.vit.blocks[0].bias, model.adapter.query, model.adapter.ln_post.weight,
                model.llm.bias]
    decay = [model.vit.conv1.weight, model.vit.blocks[0].weight, model.adapter.kv_proj.weight,
             model.adapter.proj, model.llm.weight]
    assert all(wd_of[id(p)] == 0.0 for p in no_decay)
    assert all(wd_of[id(p)] == 0.05 for p in decay)
    names = dict(model.named_parameters())
    assert skips_weight_decay("module.vit.positional_embedding", names["vit.positional_embedding"])
    # ZeRO-3 (deepspeed.zero.Init) leaves an empty 1-d tensor and the real shape in ds_shape:
    # a partitioned matrix still decays (every ZeRO-3 parameter once landed in no_decay).
    for name, param in names.items():
        placeholder = torch.nn.Parameter(torch.empty(0))
        placeholder.ds_shape = param.shape
        assert skips_weight_decay(name, placeholder) == skips_weight_decay(name, param), name


def test_optimizer_holds_exactly_the_trainable_parameters_with_scaled_lrs():
    model = _Toy()
    set_trainable(model, ["vit", "adapter"])
    assert group_of("adapter.ln_post.weight") == "vit"
    assert group_of("adapter.ln_post.weight", post_group="adapter") == "adapter"
    groups, _ = build_param_groups(model, weight_decay=0.05, group_lr_scale={"adapter": 2.0},
                                   vit_layer_decay=0.95, num_vit_layers=3)
    opt = build_optimizer(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and id(model.llm.weight) not in in_opt
    counts = count_by_group(model)
    assert counts["llm"].trainable == 0 and counts["llm"].total == 20
    sched = build_scheduler(opt, Schedule(1e-3, 0.0, 10, 100))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.adapter.kv_proj.weight)] == pytest.approx(2e-4)  # 1e-3 * 1/10 * 2
    assert lr_of[id(model.vit.blocks[2].weight)] == pytest.approx(1e-4 * 0.95)
    opt.step()
    sched.step()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.adapter.kv_proj.weight)] == pytest.approx(4e-4)


def test_unknown_group_is_rejected():
    with pytest.raises(ValueError, match="decoder"):
        set_trainable(_Toy(), ["decoder"])
    with pytest.raises(KeyError, match="text_encoder"):
        group_of("text_encoder.weight")


def test_skipped_update_changes_no_parameter_moment_or_step_count():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    optimizer = build_optimizer([{"params": list(layer.parameters()), "lr_scale": 1.0}],
                                lr=0.1, betas=(0.9, 0.98), eps=1e-6)
    scheduler = build_scheduler(optimizer, Schedule(0.1, 0.01, 1, 10))

    def step(skip: bool) -> None:
        layer(torch.randn(2, 4)).sum().backward()
        if skip:
            with skipped_update(optimizer):
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    def snapshot() -> list[torch.Tensor]:
        state = [v for p in layer.parameters() for v in optimizer.state[p].values()]
        return [t.clone() for t in (*layer.parameters(), *state)]

    step(skip=False)
    before = snapshot()  # weight, bias, then step, exp_avg, exp_avg_sq per parameter
    step(skip=True)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    step(skip=False)  # the real step is back (and the LR scheduler's wrapper with it)
    assert not any(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
