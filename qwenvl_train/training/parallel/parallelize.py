"""The one step that turns a plain, frozen-per-stage QwenVL into the configured layout.

Like torchtitan's `parallelize`: the model never learns about ranks; this applies tensor
parallelism (tensor_parallel.py) and wraps pipeline stages (pipeline.py) over one
DeepSpeed topology (topology.py), and tells the
trainer what differs per rank (who reads data, which data-parallel shard, how to step and
how to gather full weights). With pp = tp = 1 everything is a pass-through.

Trainer order: build model -> set_trainable -> `parallelize` -> `param_groups` ->
optimizer/scheduler -> `initialize` -> loader on `reads_data` ranks -> `batches` ->
`train_step` (pipeline) or the usual forward/backward/step loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwenvl_train.model.qwenvl import restore_fp32_tables
from qwenvl_train.training.parallel import pipeline as pipe_mod
from qwenvl_train.training.parallel.consolidate import full_state_dict
from qwenvl_train.training.parallel.partition import PipelineSplit, plan_split
from qwenvl_train.training.parallel.tensor_parallel import (
    apply_tensor_parallel,
    broadcast_batches,
    gather_full_state_dict,
    load_full_state_dict,
)
from qwenvl_train.training.parallel.topology import (
    ParallelSizes,
    build_grid,
    build_topology,
    reads_data,
    validate_parallel,
)

log = logging.getLogger("qwenvl_train")


@dataclass
class Parallel:
    sizes: ParallelSizes
    grid: Any  # DeepSpeed PipelineParallelGrid (the mpu)
    module: nn.Module  # what deepspeed.initialize gets: a QwenVLPipe or the (TP) model
    split: PipelineSplit | None = None

    @property
    def is_pipeline(self) -> bool:
        return self.sizes.pp > 1

    @property
    def reads_data(self) -> bool:
        """Build a loader only where this is true (one reader per model replica)."""
        return reads_data(self.grid)

    @property
    def dp_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    @property
    def dp_group(self):
        """Group over which per-replica metrics (loss, task sums, counts) are reduced."""
        return self.grid.get_data_parallel_group()

    def param_groups(self, build_groups: Callable[[Any], list[dict]]) -> list[dict]:
        """Optimizer groups from the trainer's builder, seen with plain-model names."""
        if self.is_pipeline:
            return pipe_mod.pipeline_param_groups(self.module, build_groups)
        return build_groups(self.module)

    def initialize(self, optimizer, scheduler, ds_config: dict):
        """deepspeed.initialize; `ds_config` must be built with dp size `sizes.dp`. The grid
        is DeepSpeed's mpu, so gradients reduce over data-parallel ranks only and the
        clipping norm counts each tensor shard once."""
        import deepspeed

        # Plain data parallel keeps DeepSpeed's default groups (identical to the grid's).
        ds, mpu = dict(ds_config), (self.grid if self.sizes.tp > 1 else None)
        if self.is_pipeline:
            # Activations are identical across tensor ranks; DeepSpeed's partitioned
            # transfer assumes Megatron's layout, so they travel whole. (A PipelineModule
            # brings its own grid.)
            ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False,
                              **ds.get("pipeline", {})}
            mpu = None
        engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds, mpu=mpu)
        restore_fp32_tables(engine.module)  # bf16 runs: the fixed tables stay fp32
        if self.sizes.dp == 1 and not self.is_pipeline and not engine.zero_optimization():
            # One replica: DeepSpeed would still flatten every gradient into a bucket,
            # "all-reduce" it over one rank and copy it back after each backward.
            engine.enable_backward_allreduce = False
        return engine

    def batches(self, source: Iterator[dict] | None) -> Iterator:
        """Per-rank micro-batches: `source` (the loader's iterator) on readers, None
        elsewhere. Pipeline: a PipeBatches for `train_step`; otherwise batch dicts,
        shared from the reader to its tensor-parallel peers."""
        if self.is_pipeline:
            return pipe_mod.PipeBatches(source, self.grid)
        if self.sizes.tp > 1:
            return broadcast_batches(source, self.grid.get_slice_parallel_group(),
                                     self.grid.stage_to_global(0, model=0))
        return source

    def train_step(self, engine, data) -> dict:
        """Pipeline only: one optimizer step; see pipeline.pipeline_train_step."""
        return pipe_mod.pipeline_train_step(engine, data)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Plain-model names and full tensors on global rank 0, None elsewhere. Collective;
        any layout (ZeRO-3 partitions are gathered too)."""
        if self.is_pipeline:
            return pipe_mod.gather_pipeline_state_dict(self.module, self.grid)
        if self.sizes.tp == 1:
            sd = full_state_dict(self.module)
            return sd if dist.get_rank() == 0 else None
        sd = gather_full_state_dict(self.module, self.grid.get_slice_parallel_group())
        return {k: v.cpu() for k, v in sd.items()} if dist.get_rank() == 0 else None

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load plain-model weights (every rank passes the full dict); sliced per rank."""
        if self.is_pipeline:
            pipe_mod.load_pipeline_state_dict(self.module, full, self.grid)
        else:
            load_full_state_dict(self.module, full, self.grid.get_slice_parallel_group())


def parallelize(model: nn.Module, cfg: Any, world_size: int | None = None,
                parts: list[int] | None = None) -> Parallel:
    """Apply `cfg.parallel` (a ParallelConfig; `cfg` is a validated TrainConfig or anything
    with .parallel/.model/.stage) to a built, frozen model. Needs the default process group
    (all ranks call it). `parts` overrides the compute-balanced pipeline split (DeepSpeed's
    boundary convention)."""
    world = dist.get_world_size() if world_size is None else world_size
    sizes = validate_parallel(cfg.parallel, world)
    if dist.get_rank() == 0:
        log.info("parallel layout %s, zero_stage %s", sizes, cfg.parallel.zero_stage)
    topology = build_topology(sizes)
    grid = build_grid(topology)
    apply_tensor_parallel(model, grid.get_slice_parallel_group())
    if sizes.pp == 1:
        return Parallel(sizes, grid, model)
    stage = cfg.stage
    split = plan_split(cfg.model, sizes.pp, stage.image_size, stage.seq_len,
                       list(stage.trainable), pack=bool(stage.pack),
                       adapted=cfg.model.lora.parts)
    if parts is not None:
        split = PipelineSplit(list(parts), split.layer_names, split.layer_cost)
    return Parallel(sizes, grid, pipe_mod.build_pipeline_module(model, topology, split), split)
