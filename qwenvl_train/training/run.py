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
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training.consolidate import full_state_dict
from qwenvl_train.training.engine import (
    DistInfo,
    deepspeed_config,
    grad_accumulation_steps,
    init_distributed,
    initialize_engine,
)
from qwenvl_train.training.optim import (
    Schedule,
    build_optimizer,
    build_param_groups,
    build_scheduler,
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
    if cfg.data.build_demo_if_missing and not any(root.glob("*.tar")):
        if dist_info.is_main:
            from data_recipes.demo import build_demo

            log.info("building the demo data set in %s", root)
            build_demo(root)
        dist.barrier()


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
    return {"train_micro_batch_size_per_gpu": cfg.stage.micro_batch_size,
            "zero_optimization": {"stage": 3}}


def freeze_and_group(cfg: TrainConfig, model) -> list[dict]:
    post = cfg.model.adapter.post_group
    groups.set_trainable(model, cfg.stage.trainable, post)
    counts = groups.check_trainable_groups(model, cfg.stage.trainable, post)
    param_groups, infos = build_param_groups(
        model,
        weight_decay=cfg.stage.optim.weight_decay,
        group_lr_scale=dict(cfg.stage.optim.group_lr_scale),
        vit_layer_decay=cfg.stage.optim.vit_layer_decay,
        num_vit_layers=cfg.model.vision.layers,
        post_group=post,
    )
    for name, c in counts.items():
        scales = [i.lr_scale for i in infos if i.name.startswith(name + "/")]
        lr_range = (f"lr x[{min(scales):.4f}, {max(scales):.4f}] of {cfg.stage.optim.lr:g}"
                    if scales else "frozen")
        log.info("group %-7s params %14s  trainable %14s  %s", name, f"{c.total:,}",
                 f"{c.trainable:,}", lr_range)
    return param_groups


def dummy_batch(cfg: TrainConfig) -> dict:
    """A tiny text-only batch whose zero-weighted backward stands in for a bad micro-batch."""
    tok = get_tokenizer()
    ids = torch.tensor([[tok.eod_id, tok.eod_id]])
    size = cfg.stage.image_size
    return {
        "input_ids": ids,
        "labels": torch.tensor([[-100, tok.eod_id]]),
        "position_ids": torch.tensor([[0, 1]]),
        "segment_ids": torch.ones_like(ids),
        "images": torch.zeros(0, 3, size, size),
        "task_ids": torch.zeros_like(ids),
    }


def export(cfg: TrainConfig, engine, dist_info: DistInfo) -> Path | None:
    from qwenvl_train.model.weights import export_consolidated

    state = full_state_dict(engine.module)
    out = Path(cfg.run_dir) / "export"
    if dist_info.is_main:
        export_consolidated(engine.module, cfg.model, out, state_dict=state)
    dist.barrier()
    return out


def run(cfg: TrainConfig, resolved_config: dict) -> dict:
    from qwenvl_train.data.loader import build_loader
    from qwenvl_train.training.tracking import ThroughputMeter, Tracker

    dist_info = init_distributed()
    dp_size = dist_info.world_size // (cfg.parallel.pp * cfg.parallel.tp)
    accum = grad_accumulation_steps(cfg, dp_size)
    run_dir = Path(cfg.run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved_config, indent=2))
    ensure_data(cfg, dist_info)

    model = build_qwenvl(cfg)
    param_groups = freeze_and_group(cfg, model)
    optim = cfg.stage.optim
    optimizer = build_optimizer(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    schedule = Schedule(optim.lr, optim.min_lr, optim.warmup_steps, cfg.stage.steps,
                        optim.schedule)
    scheduler = build_scheduler(optimizer, schedule)
    engine = initialize_engine(model, optimizer, scheduler, deepspeed_config(cfg, dp_size))

    loader = build_loader(
        cfg.data, cfg.stage, get_tokenizer(),
        num_image_tokens=cfg.model.adapter.num_queries, dp_rank=dist_info.rank // (
            cfg.parallel.pp * cfg.parallel.tp), dp_size=dp_size,
        micro_batch_size=cfg.stage.micro_batch_size, seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )
    state, meter_state = TrainState(), {}
    tag = ckpt.latest_tag(run_dir) if cfg.resume == "auto" else None
    if tag:
        restored = ckpt.load(engine, run_dir, tag, dist_info.rank)
        state = TrainState(**restored)
        loader.load_state_dict(state.loader)
        meter_state = state.meter
        log.info("resumed from %s at step %d", tag, state.step)

    tracker = Tracker.create(cfg.tracking, run_dir, resolved_config, dist_info.rank,
                             total_steps=cfg.stage.steps, start_step=state.step,
                             log_every=cfg.log_every)
    meter = ThroughputMeter.create(cfg, dp_size=dp_size, device=dist_info.device)
    meter.load_state_dict(meter_state)
    trainer = Trainer(cfg, dist_info, engine, loader, tracker, meter, accum,
                      dummy_batch(cfg), state)
    try:
        last = trainer.fit()
        if cfg.export_at_end and state.step >= cfg.stage.steps:
            export(cfg, engine, dist_info)
    finally:
        tracker.close()
    summary = {"step": state.step, **{k: v for k, v in last.items()
                                      if isinstance(v, (int, float, bool))}}
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_rank_result(dist_info, summary, model, param_groups)
    return summary


def _write_rank_result(dist_info: DistInfo, summary: dict, model, param_groups) -> None:
    """Per-rank facts for multi-process tests (only when QWENVL_RESULTS_DIR is set)."""
    out = os.environ.get("QWENVL_RESULTS_DIR")
    if not out:
        return
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    in_optimizer = {id(p) for g in param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    result = {
        "rank": dist_info.rank,
        "summary": summary,
        "optimizer_numel": sum(numel(p) for g in param_groups for p in g["params"]),
        "trainable_numel": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "optimizer_equals_trainable": in_optimizer == trainable,
        "frozen_in_optimizer": len(in_optimizer - trainable),
    }
    Path(out, f"rank{dist_info.rank}.json").write_text(json.dumps(result))
