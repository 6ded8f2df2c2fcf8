"""Parallel layout: pipeline x tensor x data sizes, their validation, DeepSpeed's 3D grid.

One topology (DeepSpeed's pipe x model x data grid, tensor ranks innermost so they share a
node) describes every layout: `parallel.pp` pipeline stages, `parallel.tp` tensor-parallel
ranks, and the rest of the world is data parallel. `validate_parallel` (the world-size check;
the other layout rules are `ParallelConfig.validate`'s) runs before any process group starts,
so a bad layout fails naming the key, not deep inside DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenvl_train.checks import ConfigError
from qwenvl_train.training.parallel.config import ParallelConfig


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


def validate_parallel(parallel: ParallelConfig, world_size: int) -> ParallelSizes:
    """The sizes of a layout on `world_size` ranks: pp x tp must divide the world, the rest
    is data parallel. Every other layout rule is `ParallelConfig.validate`'s, which
    `config.to_schema` has run already. Raises ConfigError naming the keys."""
    pp, tp = parallel.pp, parallel.tp
    if world_size % (pp * tp):
        raise ConfigError(
            f"parallel.pp x parallel.tp = {pp} x {tp} = {pp * tp} does not divide the world "
            f"size {world_size}; allowed: pp * tp a divisor of {world_size}"
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
