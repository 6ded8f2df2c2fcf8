"""Setting up a stage: distributed, data, model, freezing, optimizer, DeepSpeed, resume.

`run(cfg)` is what `qwenvl-train` calls after the config passed validation (including
`config.validate_launch`: the layout, the batch arithmetic and the data on disk) and the
launch checks of `training/preflight.py` (run_dir, init_from, a rerun's compatibility,
memory), with the run lock held (`training/run_lock.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwenvl_train.config import TrainConfig
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.eval.during_training import builtin_callbacks
from qwenvl_train.model import groups
from qwenvl_train.model.source_config import (
    frozen_random_parts,
    frozen_random_warning,
    resolve_init_from,
)
from qwenvl_train.tokens import IGNORE_INDEX
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training import failfast
from qwenvl_train.training.callbacks import TrainerCallback, load_callbacks
from qwenvl_train.training.optim import (
    Schedule,
    build_optimizer,
    build_param_groups,
    build_scheduler,
)
from qwenvl_train.training.parallel.engine import (
    DistInfo,
    check_device_support,
    deepspeed_config,
    init_distributed,
    uses_bf16,
)
from qwenvl_train.training.trainer import Trainer, TrainState

log = logging.getLogger("qwenvl_train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def warn_demo_data(cfg: TrainConfig, dist_info: DistInfo) -> None:
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
        source = resolve_init_from(cfg.init_from)
        log.info("initialising weights from %s", source)
        load_consolidated(model, source)
    else:
        load_init_weights(model, cfg.model.weights)
    if cfg.model.lora.enabled:  # LoRA: on top of the loaded base weights (model/lora.py)
        from qwenvl_train.model.lora import apply_lora

        apply_lora(model, cfg.model.lora, seed=cfg.seed)
    return model


def _zero3_init_config(cfg: TrainConfig) -> dict:
    # The dtype zero.Init creates the weights in must be the engine's.
    return {"train_micro_batch_size_per_gpu": cfg.stage.micro_batch_size,
            "zero_optimization": {"stage": 3}, "bf16": {"enabled": uses_bf16(cfg)}}


def freeze(cfg: TrainConfig, model) -> None:
    """requires_grad from the stage's trainable groups; log counts; refuse empty groups."""
    post = cfg.model.adapter.post_group
    # LoRA targets train only their LoRA matrices (model/lora_config.py states the rule).
    groups.set_trainable(model, cfg.stage.trainable, post, lora_parts=cfg.model.lora.parts)
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
        "images": torch.zeros(0, 3, size, size, dtype=torch.uint8),
        "task_ids": torch.zeros_like(ids),
    }


def build_engine(cfg: TrainConfig, par):
    """Optimizer groups of the layout `par`, AdamW, the stage's schedule -> DeepSpeed engine."""
    param_groups = par.param_groups(lambda module: param_groups_of(cfg, module)[0])
    optim = cfg.stage.optim
    optimizer = build_optimizer(param_groups, lr=optim.peak_lr, betas=tuple(optim.betas),
                                eps=optim.eps, fused=cfg.parallel.fused_adamw)
    schedule = Schedule(optim.peak_lr, optim.floor_lr, optim.warmup_steps, cfg.stage.steps,
                        optim.schedule)
    scheduler = build_scheduler(optimizer, schedule)
    return par.initialize(optimizer, scheduler, deepspeed_config(cfg, par.sizes.dp))


def export(cfg: TrainConfig, par, dist_info: DistInfo) -> dict[str, Path]:
    """Full weights of any layout -> run_dir/export in `export.formats` (model/export.py);
    returns where each format went (on rank 0; empty elsewhere)."""
    from qwenvl_train.model.export import export_model
    from qwenvl_train.model.lora import merged_export

    state = par.full_state_dict()  # collective; full tensors on rank 0
    paths: dict[str, Path] = {}
    if dist_info.is_main:
        # LoRA: adapters merged into the base weights; every format is the plain model.
        state, model_cfg = merged_export(state, cfg.model)
        paths = export_model(state, model_cfg, Path(cfg.run_dir) / "export", cfg.export.formats,
                             chat=cfg.stage.template == "sft", image_size=cfg.stage.image_size,
                             seq_length=cfg.stage.seq_len, max_shard_gb=cfg.export.max_shard_gb)
    dist.barrier()
    return paths


def _check_data_resume(cfg: TrainConfig, tag: str, world_size: int) -> None:
    """The launch check of what a resume may change (training/elastic.py) read the checkpoint
    `ckpt.resume_candidate` chose by sizes; `select_resume` verified the checksums too and
    may have fallen back further. Check the checkpoint it picked (data_state.json: cheap)."""
    from qwenvl_train.checks import ConfigError
    from qwenvl_train.training.elastic import check_resume

    try:
        check_resume(cfg, world_size, tag)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"cannot resume from {tag}: {e}") from None


def run(cfg: TrainConfig, callbacks: Sequence[TrainerCallback] | None = None) -> dict:
    """Train the stage; `callbacks` default to the instances `cfg.callbacks` names."""
    from qwenvl_train.data.loader import build_loader
    from qwenvl_train.training.elastic import build_exchange, layout_of, micro_batch_cost
    from qwenvl_train.training.observe.tracking import ThroughputMeter, Tracker
    from qwenvl_train.training.parallel.parallelize import parallelize

    check_device_support(cfg)  # precision / kernels this machine cannot run: ConfigError
    if callbacks is None:
        callbacks = load_callbacks(cfg.callbacks)
    callbacks = [*callbacks, *builtin_callbacks(cfg)]  # evaluation during training (eval.*)
    dist_info = init_distributed()
    failfast.start(dist_info.rank, cfg.stop_grace_s)
    run_dir = Path(cfg.run_dir)
    # Verified before anything is built: a damaged checkpoint stops (or falls back) now.
    tag = (ckpt.select_resume(run_dir, cfg.checkpoint.on_damaged, dist_info.rank)
           if cfg.resume == "auto" else None)
    if tag is not None:
        _check_data_resume(cfg, tag, dist_info.world_size)
    resolved_config = cfg.to_dict()
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved_config, indent=2))
    warn_demo_data(cfg, dist_info)

    model = build_qwenvl(cfg)
    freeze(cfg, model)
    random_frozen = frozen_random_parts(cfg.model, cfg.stage.trainable, cfg.init_from)
    if random_frozen and dist_info.is_main:
        log.warning("WARNING: %s", frozen_random_warning(random_frozen))
    par = parallelize(model, cfg)  # TP slicing and pipeline stages; pass-through otherwise
    dp_size = par.sizes.dp
    accum = cfg.stage.grad_accumulation_steps(dp_size)
    engine = build_engine(cfg, par)
    del model

    loader = None
    exchange = build_exchange(cfg, par)  # collective: the readers' group (None elsewhere)
    if par.reads_data:  # one reader per model replica; pipeline/TP peers receive from it
        # data.num_workers workers, at most one per CPU of this process
        loader = build_loader(
            cfg.data, get_tokenizer(), template=cfg.stage.template,
            image_size=cfg.stage.image_size, seq_len=cfg.stage.seq_len, pack=cfg.stage.pack,
            num_image_tokens=cfg.model.adapter.num_queries, dp_rank=par.dp_rank,
            dp_size=dp_size, micro_batch_size=cfg.stage.micro_batch_size, seed=cfg.seed,
            global_batch_size=cfg.stage.global_batch_size, exchange=exchange,
            cost=micro_batch_cost(cfg),
        )
    state, meter_state = TrainState(), {}
    if tag:
        state = TrainState(**ckpt.load(engine, run_dir, tag, dist_info.rank, par=par,
                                       layout=layout_of(cfg, par)))
        if loader is not None:
            loader.load_state_dict(ckpt.load_data_state(run_dir, tag))
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
                      dummy_batch(cfg), state, callbacks)
    failed = True
    try:
        last = trainer.fit()
        exported = {}
        if cfg.export_at_end and state.step >= cfg.stage.steps:
            exported = export(cfg, par, dist_info)
        failed = False
    finally:
        tracker.close(exit_code=int(failed))
        if source is not None:
            # Stop the data workers now (they ignore SIGTERM and SIGINT, so an exit-time
            # terminate would wait on them).
            source.close()
        trainer.preempt.close()
        if not failed:
            failfast.stop()
    summary = {"step": state.step, **{k: v for k, v in last.items()
                                      if isinstance(v, (int, float, bool))},
               "exports": {k: str(v) for k, v in exported.items()},
               "random_frozen_parts": random_frozen}
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        for fmt, path in exported.items():
            log.info("export %-12s -> %s", fmt, path)
        if random_frozen:
            log.warning("WARNING (run summary): %s", frozen_random_warning(random_frozen))
    trainer.callbacks.on_run_end(trainer, summary)
    return summary

