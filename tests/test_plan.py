"""The capacity planner: its memory model against MemTracker measurements of real steps on
the CPU, its layout arithmetic on qwenvl_7b, the micro-batch search, the pre-launch check
and the command line."""

from __future__ import annotations

import dataclasses

import pytest
from plan_helpers import make_batch, measure_step, small_config

from qwenvl_train.config import load_config
from qwenvl_train.training.observe import plan
from qwenvl_train.training.observe.memory import (
    Layout,
    layout_from_config,
    memory_per_gpu,
    options_from_config,
    param_counts,
)

TOLERANCE = 0.15  # the target for predicted vs measured

# name: (overrides, rows, packed samples per row, labels per sample, compare whole step)
CASES = {
    # LLM frozen behind the trained ViT/adapter: its activations kept for input grads only
    "pretrain_fp32": (["stage=pretrain", "stage.image_size=224", "stage.seq_len=160"],
                      4, 1, 16, True),
    # everything trained, packed rows (SDPA mask), ViT and LLM checkpointed
    "multitask_ckpt_fp32": (["stage=multitask", "stage.image_size=224", "stage.seq_len=512",
                             "model.gradient_checkpointing.vit=true",
                             "model.gradient_checkpointing.llm=true"], 2, 2, 8, True),
    # bf16 activations (fp32 norm inputs), ViT frozen in front (saves nothing). The states
    # of a bf16 model under a plain AdamW are not DeepSpeed's bf16 layout: activations only.
    "sft_bf16": (["stage=sft", "stage.image_size=448", "stage.seq_len=1024",
                  "stage.precision=bf16"], 2, 1, 32, False),
    # the chunked LM-head loss (model/loss.py): the head's input and weight gradients kept
    # from the forward pass and one [chunk, vocab] block instead of [labels, vocab] logits
    "sft_chunked_loss_fp32": (["stage=sft", "stage.image_size=224", "stage.seq_len=512",
                               "model.chunked_loss=true"], 2, 1, 240, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_memory_model_matches_memtracker(name):
    overrides, rows, per_row, labels, whole_step = CASES[name]
    cfg = small_config(*overrides)
    first, work = make_batch(cfg, rows, per_row, labels, seed=0)
    second, _ = make_batch(cfg, rows, per_row, labels, seed=1)
    measured = measure_step(cfg, [first, second])  # 2 micro-batches: gradients accumulate
    predicted = memory_per_gpu(cfg.model, list(cfg.stage.trainable), cfg.stage.image_size,
                               work, options_from_config(cfg, on_cuda=False), Layout(),
                               accum=2, pack=cfg.stage.pack)
    act_measured = measured["backward_peak"] - measured["states"]
    act_predicted = predicted.activations + predicted.transient
    print(f"{name}: activations + transient predicted {act_predicted / 2**20:.1f} MiB, "
          f"measured {act_measured / 2**20:.1f}; step peak predicted "
          f"{predicted.peak / 2**20:.1f}, measured {measured['step_peak'] / 2**20:.1f}")
    assert act_measured > 0.15 * measured["step_peak"]  # activations matter in each case
    assert abs(act_predicted / act_measured - 1) < TOLERANCE
    if whole_step:
        assert abs(predicted.states / measured["states"] - 1) < 0.01  # counted, not modelled
        assert abs(predicted.peak / measured["step_peak"] - 1) < TOLERANCE


@pytest.fixture(scope="module")
def paper_7b():
    return {s: load_config(["model=qwenvl_7b", f"stage={s}", "parallel=zero2"])
            for s in ("pretrain", "multitask", "sft")}


def test_qwenvl_7b_parameters_and_sharding(paper_7b):
    cfg = paper_7b["multitask"]
    counts = param_counts(cfg.model)
    total = sum(sum(g.values()) for g in counts.whole + counts.split)
    assert 9.6e9 < total < 9.7e9  # RECIPE.md: 9.6B (bf16 checkpoint 19.3 GB)
    opt = dataclasses.replace(options_from_config(cfg), checkpoint={"vit": 0, "llm": 0})
    work = plan.workload(cfg, 2)

    def mem(layout: Layout):
        return memory_per_gpu(cfg.model, list(cfg.stage.trainable), cfg.stage.image_size,
                              work, opt, layout, accum=64, pack=True)

    single, z1 = mem(Layout(dp=8)), mem(Layout(dp=8, zero=1))
    z2, z3 = mem(Layout(dp=8, zero=2)), mem(Layout(dp=8, zero=3))
    assert single.params == pytest.approx(2 * total)  # bf16 weights
    assert single.optimizer == pytest.approx(12 * total)  # fp32 master + Adam moments
    assert z1.optimizer == pytest.approx(single.optimizer / 8) and z1.grads == single.grads
    assert z2.grads == pytest.approx(single.grads / 8)
    assert z3.params == pytest.approx(single.params / 8)
    assert single.activations == z3.activations  # ZeRO shards states, not activations
    tp2 = mem(Layout(tp=2, dp=4, zero=1))
    split = sum(sum(g.values()) for g in counts.split)
    assert tp2.params == pytest.approx(2 * (total - split / 2))
    assert tp2.activations < single.activations
    pp2 = mem(Layout(pp=2, dp=4, zero=1))
    assert pp2.params < 0.75 * single.params  # the most loaded stage holds part of it


def test_checkpointing_and_maskless_attention_save_memory(paper_7b):
    cfg = paper_7b["multitask"]
    layout = layout_from_config(cfg, 8)
    base = options_from_config(cfg)
    sdpa = dataclasses.replace(base, attention="sdpa", checkpoint={"vit": 0, "llm": 0})
    flex = dataclasses.replace(sdpa, attention="flex")
    ckpt = dataclasses.replace(flex, checkpoint={"vit": 1, "llm": 1})
    every2 = dataclasses.replace(flex, checkpoint={"vit": 2, "llm": 2})
    act = {name: plan.memory_for(cfg, layout, o, 2).activations
           for name, o in (("sdpa", sdpa), ("flex", flex), ("ckpt", ckpt), ("every2", every2))}
    rows, length = 2, cfg.stage.seq_len
    # SDPA: the boolean mask once + a float copy per decoder layer
    assert act["sdpa"] - act["flex"] == pytest.approx(
        rows * length**2 * (1 + 2 * cfg.model.llm.num_layers))
    assert act["ckpt"] < act["every2"] < act["flex"]
    assert act["ckpt"] < 0.1 * act["flex"]


def test_max_micro_batch_is_the_largest_that_fits(paper_7b):
    cfg = paper_7b["pretrain"]
    layout, opt = layout_from_config(cfg, 8), options_from_config(cfg)
    device = plan.gpu("H100")
    best = plan.max_micro_batch(cfg, layout, opt, device.usable)
    assert best >= 1
    assert plan.memory_for(cfg, layout, opt, best).peak <= device.usable
    assert plan.memory_for(cfg, layout, opt, best + 1).peak > device.usable
    assert plan.max_micro_batch(cfg, layout, opt, 1e9) == 0  # 1 GB holds not even the weights


def test_required_memory_bytes_for_a_prelaunch_check(paper_7b):
    needed, available = plan.required_memory_bytes(paper_7b["multitask"], 8, "H100")
    assert 0 < needed < available == int(plan.GPU_MEMORY_MIB["H100"] * 2**20 * 0.9)
    single = load_config(["model=qwenvl_7b", "stage=multitask", "parallel=single"])
    needed, available = plan.required_memory_bytes(single, 8, "H100")
    assert needed > available  # unsharded fp32 master + Adam for 9.6B parameters: no
    needed, available = plan.required_memory_bytes(small_config("stage=pretrain"), 1, "cpu")
    assert 0 < needed < available


def test_step_time_uses_the_projects_flops(paper_7b):
    from qwenvl_train.training.observe import flops

    cfg = paper_7b["pretrain"]
    work = plan.workload(cfg, cfg.stage.global_batch_size)
    assert plan.step_flops_of(cfg) == flops.step_flops(
        cfg.model, 224, work.tokens, work.images, 512, ["vit", "adapter"],
        loss_tokens=work.label_tokens)
    row = plan.plan_row(cfg, "zero2", 8, plan.gpu("H100"), 0.4)
    assert row.step_time == pytest.approx(row.step_flops / (8 * 989e12 * 0.4))


def test_cli_prints_the_table_and_rejects_bad_input(capsys):
    from qwenvl_train.cli.plan import main

    assert main(["model=qwenvl_7b", "--gpu", "H200", "--world", "8", "--stages", "sft",
                 "--layouts", "zero3,tp2"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("sft ")]
    assert [ln.split()[1] for ln in lines] == ["zero3", "tp2"] and "8 x H200" in out
    for argv, says in ((["--gpu", "B200"], "--gpu"), (["model=nope"], "model"),
                       (["--world", "3", "--layouts", "tp2"], "parallel.pp x parallel.tp")):
        assert main(["model=qwenvl_7b", *argv]) == 2
        assert says in capsys.readouterr().err
