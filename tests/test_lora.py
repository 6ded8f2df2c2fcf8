"""LoRA (model/lora.py, model/lora_config.py): the layer's formula, targets from the registry,
the freezing rule, optimizer groups, merging at export, config validation, and one 2-rank
ZeRO-3 run that trains, checkpoints only trainable tensors, resumes exactly and exports
merged."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from model_helpers import released_ckpt, sample_ids, tiny_config
from safetensors.torch import save_file
from trainer_helpers import TRAIN, callbacks, export_state, metrics, overrides, plugin

from qwenvl_train.config import ConfigError, load_config
from qwenvl_train.model import groups as G
from qwenvl_train.model.lora import (
    apply_lora,
    lora_linears,
    merge_lora_state_dict,
    merged_export,
)
from qwenvl_train.model.lora_config import LoRAConfig
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.model.released import released_config
from qwenvl_train.model.weights import export_consolidated, load_consolidated, load_qwenvl
from qwenvl_train.training.checkpoint import latest_tag
from qwenvl_train.training.observe.flops import part_multipliers
from qwenvl_train.training.optim import build_param_groups

CFG = tiny_config()
ALL = LoRAConfig(enabled=True, rank=4, alpha=8.0, dropout=0.0, targets=list(G.GROUPS))


@pytest.fixture(scope="module")
def base():
    """One randomly initialised tiny model; tests adapt deep copies of it."""
    torch.manual_seed(0)
    return build_model(CFG, 56).eval()


def _adapted(base, lora: LoRAConfig = ALL, seed: int = 100):
    model = copy.deepcopy(base)
    apply_lora(model, lora, seed=seed)
    return model


def _randomize_b(model, seed: int = 7) -> None:
    """Trained-looking adapters (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_linears(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.05)


def _inputs(image_size: int = 56, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = sample_ids(40, 1, CFG.adapter.num_queries, gen)[None]
    return ids, torch.randn(1, 3, image_size, image_size, generator=gen)


@torch.no_grad()
def test_lora_linear_is_the_formula_and_zero_b_is_the_identity(base):
    plain, adapted = base, _adapted(base)
    ids, images = _inputs()
    # B = 0: the function is the base model's, bitwise.
    assert torch.equal(adapted(ids, images).logits, plain(ids, images).logits)
    _randomize_b(adapted)
    q = adapted.get_submodule(f"{G.llm_layer(1)}.{G.LLM_LAYER.q}")
    x = torch.randn(3, 5, q.in_features)
    scale = ALL.alpha / ALL.rank
    want = F.linear(x, q.weight, q.bias) + scale * (x @ q.lora_A.T @ q.lora_B.T)
    assert (q(x) - want).abs().max() < 1e-6
    # Dropout acts on the adapter's input only, in training mode.
    drop = _adapted(base, LoRAConfig(enabled=True, rank=4, dropout=0.5))
    _randomize_b(drop)
    q = drop.get_submodule(f"{G.llm_layer(0)}.{G.LLM_LAYER.v}").train()
    torch.manual_seed(11)
    got = q(x)
    torch.manual_seed(11)
    mask_x = F.dropout(x, 0.5, training=True)
    want = F.linear(x, q.weight, q.bias) + q.lora_scale * (mask_x @ q.lora_A.T @ q.lora_B.T)
    assert (got - want).abs().max() < 1e-6
    assert (q.eval()(x) - got).abs().max() > 1e-3


def test_targets_names_and_groups_come_from_the_registry(base):
    plain, model = base, _adapted(base)
    assert set(lora_linears(model)) == set(G.lora_targets(CFG, G.GROUPS))
    default = _adapted(base, LoRAConfig(enabled=True))
    assert set(lora_linears(default)) == set(G.lora_targets(CFG))
    names = dict(model.named_parameters())
    lora_names = {n for n in names if G.is_lora(n)}
    # The plain model's names are untouched; each target gains exactly A and B.
    assert set(names) - lora_names == set(dict(plain.named_parameters()))
    for path in G.lora_targets(CFG, G.GROUPS):
        linear = model.get_submodule(path)
        a, b = names[f"{path}.{G.LORA_A}"], names[f"{path}.{G.LORA_B}"]
        assert a.shape == (ALL.rank, linear.in_features)
        assert b.shape == (linear.out_features, ALL.rank) and not b.any()
        assert G.group_of(f"{path}.{G.LORA_A}") == G.group_of(f"{path}.weight")
    assert len(lora_names) == 2 * len(G.lora_targets(CFG, G.GROUPS))
    # Same seed, same A on every rank; another seed, another A.
    path = f"{G.llm_layer(0)}.{G.LLM_LAYER.up}.{G.LORA_A}"
    a = dict(model.named_parameters())[path]
    assert torch.equal(a, dict(_adapted(base).named_parameters())[path])
    assert not torch.equal(a, dict(_adapted(base, seed=101).named_parameters())[path])


def test_freezing_rule_and_optimizer_groups(base):
    model = _adapted(base, LoRAConfig(enabled=True, rank=4, targets=["vit", "llm"]))
    G.set_trainable(model, ["vit", "adapter", "llm"], lora_parts=["vit", "llm"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, _ in model.named_parameters() if G.group_of(n) == "adapter"}
    lora = {n for n, _ in model.named_parameters() if G.is_lora(n)}
    # Adapter (no LoRA targets): trains fully; vit and llm: only their LoRA matrices.
    assert trainable == adapter | lora
    counts = G.check_trainable_groups(model, ["vit", "adapter", "llm"])
    assert counts["llm"].trainable == sum(p.numel() for n, p in model.named_parameters()
                                          if n in lora and G.group_of(n) == "llm")
    groups, infos = build_param_groups(model, weight_decay=0.05,
                                       group_lr_scale={"llm": 0.5, "adapter": 2.0},
                                       vit_layer_decay=0.9, num_vit_layers=CFG.vision.layers)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert len(by_param) == sum(len(g["params"]) for g in groups)  # one group per param
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in trainable} == set(by_param)
    for name in lora:
        g = by_param[id(params[name])]
        group = G.group_of(name)
        assert g["name"].startswith(f"{group}/lora/") and g["weight_decay"] == 0.05
        want = (G.layer_decay_scale(name, CFG.vision.layers, 0.9) if group == "vit" else 0.5)
        assert g["lr_scale"] == pytest.approx(want)
    assert all("/lora/" not in g["name"] for n in adapter for g in [by_param[id(params[n])]])
    assert sum(i.numel for i in infos) == sum(params[n].numel() for n in trainable)
    # FLOPs: an adapted group backpropagates activations but computes no weight gradients.
    assert part_multipliers(["adapter", "llm"], adapted=["llm"]) == {
        "vit": 1, "adapter": 3, "adapter_post": 2, "llm": 2}


@torch.no_grad()
def test_merge_is_exact_for_zero_b_and_the_merged_export_has_the_unmerged_logits(base,
                                                                                 tmp_path):
    plain, model = base, _adapted(base)
    merged = merge_lora_state_dict(model.state_dict(), ALL.scale)
    assert merged.keys() == plain.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in plain.state_dict().items())

    _randomize_b(model)
    ids, images = _inputs()
    unmerged = model(ids, images).logits
    cfg = CFG.__class__.from_dict({**CFG.to_dict(), "lora": {**ALL.__dict__}})
    state, export_cfg = merged_export(model.state_dict(), cfg)
    assert not export_cfg.lora.enabled and not any(G.is_lora(k) for k in state)
    with torch.device("meta"):
        skeleton = build_model(export_cfg, 56)
    out = export_consolidated(skeleton, export_cfg, tmp_path / "export", state_dict=state)
    assert json.loads((out / "config.json").read_text())["lora"]["enabled"] is False
    torch.manual_seed(5)
    loaded = build_model(CFG, 56).eval()
    load_consolidated(loaded, out)
    diff = float((loaded(ids, images).logits - unmerged).abs().max())
    print(f"[max abs diff] merged export vs unmerged LoRA logits: {diff:.2e} "
          f"(logit scale {float(unmerged.abs().max()):.2f})")
    assert diff < 1e-5
    assert float((unmerged - plain(ids, images).logits).abs().max()) > 1e-3  # LoRA mattered
    with pytest.raises(KeyError, match="without their pair"):
        merge_lora_state_dict({"llm.x.weight": torch.zeros(2, 2),
                               "llm.x.lora_B": torch.zeros(2, 1)}, 1.0)


@pytest.mark.parametrize("overrides_, key", [
    (["model.lora.targets=[llm,decoder]"], "model.lora.targets"),
    (["model.lora.targets=[]"], "model.lora.targets"),
    (["model.lora.targets=[llm,llm]"], "model.lora.targets"),
    (["model.lora.rank=0"], "model.lora.rank"),
    (["model.lora.alpha=-1"], "model.lora.alpha"),
    (["model.lora.dropout=1.0"], "model.lora.dropout"),
    (["+model.lora.bias=all"], "model.lora.bias"),
    # the LLM is frozen in stage 1: LoRA on it would train nothing
    (["stage=pretrain", "model.lora.enabled=true"], "model.lora.targets"),
    (["stage=sft", "model.lora.enabled=true", "parallel=tp2"], "model.lora.dropout"),
])
def test_bad_lora_config_fails_naming_the_key(overrides_, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides_)
    assert key in str(err.value)


def test_good_lora_configs_validate():
    cfg = load_config(["stage=sft", "model.lora.enabled=true", "parallel=tp2",
                       "model.lora.dropout=0", "model.lora.targets=[llm,adapter]"])
    assert cfg.model.lora.parts == ["llm", "adapter"]
    assert load_config(["stage=pretrain", "model.lora.enabled=true",
                        "model.lora.targets=[vit]"]).model.lora.scale == 16.0 / 8
    assert load_config(["model=qwenvl_7b"]).model.lora.rank == 64
    assert load_config(["stage=pretrain"]).model.lora.parts == []  # off by default


def test_build_applies_lora_after_init_from(tmp_path):
    """Stage chaining: the export's weights load first, then LoRA (zero B) on top."""
    from qwenvl_train.training.run import build_qwenvl, freeze

    model_cfg = load_config(["model=tiny"]).model
    torch.manual_seed(42)
    src = build_model(model_cfg, 224)
    export_consolidated(src, model_cfg, tmp_path / "export")
    cfg = load_config(["model=tiny", "stage=sft", "model.lora.enabled=true",
                       f"init_from={tmp_path / 'export'}", f"run_dir={tmp_path / 'run'}"])
    model = build_qwenvl(cfg)
    freeze(cfg, model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())
    assert set(lora_linears(model)) == set(G.lora_targets(model_cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if G.is_lora(n) or G.group_of(n) == "adapter"}


def test_resume_refuses_a_checkpoint_of_other_trainable_tensors(base, tmp_path):
    from qwenvl_train.training import checkpoint as ckpt

    model = _adapted(base)
    G.set_trainable(model, ["adapter", "llm"], lora_parts=["llm"])
    engine = SimpleNamespace(module=model)
    ckpt._check_trainable(ckpt._trainable_names(engine), engine, tmp_path)  # same: fine
    G.set_trainable(model, ["adapter", "llm"])  # LoRA switched off on resume
    with pytest.raises(ValueError, match="model.lora changed"):
        ckpt._check_trainable([n for n in ckpt._trainable_names(engine) if "lora" in n],
                              engine, tmp_path)


# ---- 2 ranks, ZeRO-3, through the trainer ----------------------------------------------
def _checkpoint_contents(step_dir: Path) -> dict[str, int]:
    """Parameter name -> numel of what the checkpoint's model-state files record, and the
    fp32 elements held in the optimizer partitions (`__optimizer__`)."""
    shapes: dict[str, int] = {}
    for path in step_dir.glob("*model_states.pt"):
        state = torch.load(path, weights_only=False, map_location="cpu")
        for group in state["param_shapes"]:
            shapes.update({k: int(torch.Size(v).numel()) for k, v in group.items()})
        assert not state.get("frozen_param_shapes"), "frozen tensors were saved"
    shapes["__optimizer__"] = 0
    for path in step_dir.glob("*optim_states.pt"):
        state = torch.load(path, weights_only=False, map_location="cpu")
        flat = state["optimizer_state_dict"]["fp32_flat_groups"]
        shapes["__optimizer__"] += sum(int(t.numel()) for t in flat)
    return shapes


@pytest.mark.slow
def test_lora_zero3_two_ranks_trains_resumes_and_exports_merged(torchrun, demo_data, tmp_path):
    """Stage 3 from a released-layout checkpoint (model.weights.qwenvl) with LoRA on the LLM:
    the adapter trains fully, the LLM only through LoRA; the checkpoint holds just those;
    a kill + rerun repeats the pre-kill losses bitwise; the export is the merged plain model."""
    from conftest import launch_torchrun

    model_cfg = load_config(["model=tiny"]).model
    released = tmp_path / "released"
    released.mkdir()
    save_file(released_ckpt(model_cfg, torch.Generator().manual_seed(4)),
              str(released / "model.safetensors"))
    (released / "config.json").write_text(json.dumps(released_config(model_cfg, 224, "float32")))
    run = tmp_path / "run"
    args = [*TRAIN, *overrides(run, demo_data, "parallel=zero3", "model.lora.enabled=true",
                               f"model.weights.qwenvl={released}", "stage.image_size=224",
                               steps=4, stage="sft")]
    kill = callbacks(plugin("faults.KillAfterStep", step=4))
    killed = torchrun([*args, kill], nproc=2, check=False)
    assert killed.returncode != 0 and latest_tag(run) == "step_0000002"
    before_kill = {m["step"]: m["loss"] for m in metrics(run)}

    adapted = build_model(model_cfg, 224)
    load_qwenvl(adapted, released)
    imported = {k: v.clone() for k, v in adapted.state_dict().items()}
    apply_lora(adapted, load_config(["model=tiny", "model.lora.enabled=true",
                                     "stage=sft"]).model.lora, seed=0)
    lora_numel = sum(p.numel() for n, p in adapted.named_parameters() if G.is_lora(n))
    adapter = {n: p.numel() for n, p in adapted.named_parameters() if G.group_of(n) == "adapter"}
    saved = _checkpoint_contents(run / "checkpoints" / "step_0000002")
    optimizer = saved.pop("__optimizer__")
    assert set(saved) == {n for n, _ in adapted.named_parameters()
                          if G.is_lora(n) or n in adapter}
    assert optimizer == lora_numel + sum(adapter.values())
    trained = lora_numel + sum(adapter.values())
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_0000002").iterdir())
    print(f"LoRA checkpoint: {size / 1e6:.2f} MB for {lora_numel:,} LoRA + "
          f"{sum(adapter.values()):,} adapter parameters")
    # fp32 master + 2 AdamW moments per trained parameter, plus small per-rank files (the
    # full fine-tuning checkpoint of this stage is 235 MB)
    assert size < 12 * trained + 300_000

    results = tmp_path / "results"
    resumed = launch_torchrun(
        [*args, callbacks(plugin("results.RankResults", out=str(results)))], 2, results=results)
    # metrics.jsonl keeps the lines up to the restored step 2; the rerun logs 3 and 4 again
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    after = {m["step"]: m["loss"] for m in rows if m["step"] > 2}
    assert {s: before_kill[s] for s in (3, 4)} == after
    for rank in (0, 1):
        r = resumed.ranks[rank]
        assert r["optimizer_equals_trainable"] and r["frozen_in_optimizer"] == 0
        assert r["trainable_numel"] == trained

    export = export_state(run)
    assert export.keys() == imported.keys()  # merged: the plain model's names
    assert json.loads((run / "export" / "config.json").read_text())["lora"]["enabled"] is False
    linears = {f"{p}.weight" for p in G.lora_targets(model_cfg)}
    changed = {k for k in export if not torch.equal(export[k], imported[k])}
    assert linears <= changed  # the merged LoRA updates
    # Everything else of the LLM and the ViT is the imported model, bitwise; the adapter
    # (trained fully) moved.
    assert {k for k in changed if G.group_of(k) != "adapter"} == linears
    assert any(G.group_of(k) == "adapter" for k in changed)
