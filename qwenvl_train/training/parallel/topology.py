"""Parallel layout: pipeline x tensor x data sizes, their validation, DeepSpeed's 3D grid.

One topology (DeepSpeed's pipe x model x data grid, tensor ranks innermost so they share a
node) describes every layout: `parallel.pp` pipeline stages, `parallel.tp` tensor-parallel
ranks, and the rest of the world is data parallel. `validate_parallel` runs before any
process group starts so a bad layout fails naming the key, not deep inside DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenvl_train.config import ConfigError, cfg_get


@dataclass(frozen=True)
class ParallelSizes:
    pp: int
    tp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    def __str__(self) -> str:
        return f"pp{self.pp} x tp{self.tp} x dp{self.dp}"


def validate_parallel(
    parallel_cfg: Any, world_size: int, model_cfg: Any, zero_stage: int | None = None
) -> ParallelSizes:
    """Check a layout against the world size and the model; returns the sizes.

    Raises ConfigError (a ValueError) naming the offending key and what is allowed."""
    pp, tp = int(cfg_get(parallel_cfg, "pp", 1)), int(cfg_get(parallel_cfg, "tp", 1))
    zero = int(cfg_get(parallel_cfg, "zero_stage", 0) if zero_stage is None else zero_stage)
    for key, value in (("pp", pp), ("tp", tp)):
        if value < 1:
            raise ConfigError(f"parallel.{key}: must be >= 1, got {value}")
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be one of (0, 1, 2, 3), got {zero}")
    if world_size % (pp * tp):
        raise ConfigError(
            f"parallel.pp x parallel.tp = {pp} x {tp} = {pp * tp} does not divide the world "
            f"size {world_size}; allowed: pp * tp a divisor of {world_size}"
        )
    if pp > 1 and zero != 1:
        # ZeRO-2/3 partition gradients, which the pipeline engine's own reduction cannot
        # handle; ZeRO-0 under a pipeline computes the clipping norm on the wrong group
        # and fails to reload bf16 checkpoints.
        raise ConfigError(
            f"parallel.zero_stage: must be 1 with pipeline parallelism (parallel.pp={pp}), "
            f"got {zero}"
        )
    if tp > 1 and zero == 3:
        raise ConfigError(
            f"parallel.zero_stage: 3 (partitioned parameters) is not supported with "
            f"tensor parallelism (parallel.tp={tp}); allowed: 0, 1, 2"
        )
    layers = int(cfg_get(model_cfg, "llm.num_layers", 0))
    if pp > 1 and layers and pp > layers:
        raise ConfigError(
            f"parallel.pp: {pp} stages exceed model.llm.num_layers={layers}; allowed: "
            f"1..{layers}"
        )
    if pp > 1 and bool(cfg_get(model_cfg, "llm.tie_word_embeddings", False)):
        raise ConfigError(
            "parallel.pp: pipeline parallelism needs untied embeddings "
            "(model.llm.tie_word_embeddings=false): the embedding and the LM head live on "
            "different stages"
        )
    if tp > 1:
        for key in ("llm.num_heads", "llm.num_kv_heads", "llm.intermediate_size",
                    "vision.heads", "vision.mlp_dim"):
            value = cfg_get(model_cfg, key)
            if value is not None and int(value) % tp:
                raise ConfigError(
                    f"parallel.tp: {tp} does not divide model.{key}={value}; tensor "
                    f"parallelism splits it evenly across ranks"
                )
    return ParallelSizes(pp=pp, tp=tp, dp=world_size // (pp * tp))


def build_topology(sizes: ParallelSizes):
    """DeepSpeed's 3D process topology (axes pipe, data, model; model varies fastest)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=sizes.pp, num_mp=sizes.tp, num_dp=sizes.dp)


def build_grid(topology):
    """Process groups of the topology (needs the default process group). The grid is the
    `mpu` DeepSpeed takes: data-parallel group for gradient reduction, model-parallel
    group (`get_slice_parallel_group`) for tensor parallelism."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    return PipelineParallelGrid(topology=topology)


@dataclass(frozen=True)
class RankCoord:
    stage: int
    tp_rank: int
    dp_rank: int


def rank_coord(grid) -> RankCoord:
    return RankCoord(
        stage=grid.get_stage_id(),
        tp_rank=grid.get_slice_parallel_rank(),
        dp_rank=grid.get_data_parallel_rank(),
    )


def reads_data(grid) -> bool:
    """Only one rank per pipeline replica reads data: the first stage's tensor rank 0.

    It hands batches to its tensor-parallel peers (`broadcast_batches`); later stages get
    everything they need (positions, segments, labels) through the pipeline itself."""
    coord = rank_coord(grid)
    return coord.stage == 0 and coord.tp_rank == 0
