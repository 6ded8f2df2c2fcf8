"""Setting up a stage: distributed, data, model, freezing, optimizer, DeepSpeed, resume.

`run(cfg)` is what `qwenvl-train` calls after the config passed validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_train.config import TrainConfig
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.model import groups
from qwenvl_train.tokens import IGNORE_INDEX
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training.optim import (
    Schedule,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)
from qwenvl_train.training.parallel.engine import (
    DistInfo,
    deepspeed_config,
    grad_accumulation_steps,
    init_distributed,
    uses_bf16,
)
from qwenvl_train.training.trainer import Trainer, TrainState

log = logging.getLogger("qwenvl_train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def ensure_data(cfg: TrainConfig, dist_info: DistInfo) -> None:
    """Build the offline demo shards once (rank 0) when the data config asks for it."""
    root = Path(cfg.data.root)
    # Rank 0 alone decides and builds; every rank waits at the barrier either way.
    if dist_info.is_main and cfg.data.build_demo_if_missing and not any(root.glob("*.tar")):
        from data_recipes.demo import build_demo

        log.info("building the demo data set in %s", root)
        build_demo(root)
    dist.barrier()
    if dist_info.is_main and cfg.data.name == "demo" and cfg.model.name != "tiny":
        log.warning("model=%s is training on the CPU demo data set (data=demo); pass your "
                    "own data config, e.g. data=mixture_multitask", cfg.model.name)


def build_qwenvl(cfg: TrainConfig):
    """The model, built partitioned under ZeRO-3, with its init weights loaded."""
    import transformers  # noqa: F401  (must be imported before zero.Init patches modules)

    from qwenvl_train.model.qwenvl import build_model
    from qwenvl_train.model.weights import load_consolidated, load_init_weights

    seed_everything(cfg.seed)
    context = contextlib.nullcontext()
    if cfg.parallel.zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=_zero3_init_config(cfg))
    with context:
        model = build_model(cfg.model, image_size=cfg.stage.image_size)
    if cfg.init_from:
        source = ckpt.resolve_init_from(cfg.init_from)
        log.info("initialising weights from %s", source)
        load_consolidated(model, source)
    else:
        load_init_weights(model, cfg.model.weights)
    return model


def _zero3_init_config(cfg: TrainConfig) -> dict:
    # The dtype zero.Init creates the weights in must be the engine's.
    return {"train_micro_batch_size_per_gpu": cfg.stage.micro_batch_size,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": uses_bf16(cfg)}}


def freeze(cfg: TrainConfig, model) -> None:
    """requires_grad from the stage's trainable groups; log counts; refuse empty groups."""
    post = cfg.model.adapter.post_group
    groups.set_trainable(model, cfg.stage.trainable, post)
    counts = groups.check_trainable_groups(model, cfg.stage.trainable, post)
    _, infos = param_groups_of(cfg, model)
    for name, c in counts.items():
        scales = [i.lr_scale for i in infos if i.name.startswith(name + "/")]
        lr_range = (f"lr x[{min(scales):.4f}, {max(scales):.4f}] of {cfg.stage.optim.peak_lr:g}"
                    if scales else "frozen")
        log.info("group %-7s params %14s  trainable %14s  %s", name, f"{c.total:,}",
                 f"{c.trainable:,}", lr_range)


def param_groups_of(cfg: TrainConfig, module) -> tuple[list[dict], list]:
    return build_param_groups(
        module,
        weight_decay=cfg.stage.optim.weight_decay,
        group_lr_scale=dict(cfg.stage.optim.group_lr_scale),
        vit_layer_decay=cfg.stage.optim.vit_layer_decay,
        num_vit_layers=cfg.model.vision.layers,
        post_group=cfg.model.adapter.post_group,
    )


def dummy_batch(cfg: TrainConfig) -> dict:
    """A tiny text-only batch whose zero-weighted backward stands in for a bad micro-batch."""
    tok = get_tokenizer()
    ids = torch.tensor([[tok.eod_id, tok.eod_id]])
    size = cfg.stage.image_size
    return {
        "input_ids": ids,
        "labels": torch.tensor([[IGNORE_INDEX, tok.eod_id]]),
        "position_ids": torch.tensor([[0, 1]]),
        "segment_ids": torch.ones_like(ids),
        "images": torch.zeros(0, 3, size, size),
        "task_ids": torch.zeros_like(ids),
    }


def export(cfg: TrainConfig, par, dist_info: DistInfo) -> Path:
    """Consolidated weights of any layout -> run_dir/export (loadable by any layout)."""
    from qwenvl_train.model.qwenvl import build_model
    from qwenvl_train.model.weights import export_consolidated

    state = par.full_state_dict()  # collective; full tensors on rank 0
    out = Path(cfg.run_dir) / "export"
    if dist_info.is_main:
        with torch.device("meta"):  # names and the LLM config only; no memory
            skeleton = build_model(cfg.model, image_size=cfg.stage.image_size)
        export_consolidated(skeleton, cfg.model, out, state_dict=state)
    dist.barrier()
    return out


def run(cfg: TrainConfig, resolved_config: dict) -> dict:
    from qwenvl_train.data.loader import build_loader
    from qwenvl_train.training.observe.tracking import ThroughputMeter, Tracker
    from qwenvl_train.training.parallel.parallelize import parallelize

    dist_info = init_distributed()
    run_dir = Path(cfg.run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved_config, indent=2))
    ensure_data(cfg, dist_info)

    model = build_qwenvl(cfg)
    freeze(cfg, model)
    par = parallelize(model, cfg)  # TP slicing and pipeline stages; pass-through otherwise
    dp_size = par.sizes.dp
    accum = grad_accumulation_steps(cfg, dp_size)
    param_groups = par.param_groups(lambda module: param_groups_of(cfg, module)[0])
    optimizer_check = (_optimizer_check(par.module, param_groups) if not par.is_pipeline
                       else {})  # measured before DeepSpeed flattens the groups
    optim = cfg.stage.optim
    optimizer = build_optimizer(param_groups, lr=optim.peak_lr, betas=tuple(optim.betas),
                                eps=optim.eps, fused=cfg.parallel.fused_adamw)
    schedule = Schedule(optim.peak_lr, optim.floor_lr, optim.warmup_steps, cfg.stage.steps,
                        optim.schedule)
    scheduler = build_scheduler(optimizer, schedule)
    engine = par.initialize(optimizer, scheduler, deepspeed_config(cfg, dp_size))
    del model

    loader = None
    if par.reads_data:  # one reader per model replica; pipeline/TP peers receive from it
        loader = build_loader(
            cfg.data, get_tokenizer(), template=cfg.stage.template,
            image_size=cfg.stage.image_size, seq_len=cfg.stage.seq_len, pack=cfg.stage.pack,
            num_image_tokens=cfg.model.adapter.num_queries, dp_rank=par.dp_rank,
            dp_size=dp_size, micro_batch_size=cfg.stage.micro_batch_size, seed=cfg.seed,
            num_workers=cfg.data.num_workers,
        )
    state, meter_state = TrainState(), {}
    tag = _agreed(ckpt.latest_tag(run_dir) if cfg.resume == "auto" else None)
    if tag:
        state = TrainState(**ckpt.load(engine, run_dir, tag, dist_info.rank))
        if loader is not None:
            loader.load_state_dict(state.loader)
        meter_state = state.meter
        log.info("resumed from %s at step %d", tag, state.step)
    source = iter(loader) if loader is not None else None
    data = par.batches(source)

    tracker = Tracker.create(cfg.tracking, run_dir, resolved_config, dist_info.rank,
                             total_steps=cfg.stage.steps, start_step=state.step,
                             log_every=cfg.log_every)
    meter = ThroughputMeter.create(cfg, dp_size=dp_size, device=dist_info.device)
    meter.load_state_dict(meter_state)
    trainer = Trainer(cfg, dist_info, engine, par, loader, data, tracker, meter, accum,
                      dummy_batch(cfg), state)
    try:
        last = trainer.fit()
        if cfg.export_at_end and state.step >= cfg.stage.steps:
            export(cfg, par, dist_info)
    finally:
        tracker.close()
        if source is not None:
            # Stop the data workers now (they ignore SIGTERM, so an exit-time terminate
            # would wait on them).
            source.close()
    summary = {"step": state.step, **{k: v for k, v in last.items()
                                      if isinstance(v, (int, float, bool))}}
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    out = os.environ.get("QWENVL_RESULTS_DIR")
    if out:  # per-rank facts for the multi-process tests
        result = {"rank": dist_info.rank, "summary": summary, **optimizer_check}
        Path(out, f"rank{dist_info.rank}.json").write_text(json.dumps(result))
    return summary


def _agreed(value):
    """Rank 0's value on every rank (e.g. the resume tag on node-local disks)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _optimizer_check(model, param_groups: list[dict]) -> dict:
    """Does the optimizer hold exactly the trainable parameters?"""
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    in_optimizer = {id(p) for g in param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {
        "optimizer_numel": sum(numel(p) for g in param_groups for p in g["params"]),
        "trainable_numel": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "optimizer_equals_trainable": in_optimizer == trainable,
        "frozen_in_optimizer": len(in_optimizer - trainable),
    }
