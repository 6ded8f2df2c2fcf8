"""DeepSpeed: distributed init, the generated config, and engine construction.

The DeepSpeed config is derived from the `stage` and `parallel` config groups; users pass
extra keys through `parallel.deepspeed`. It never names a scheduler (ours is the stage's
cosine schedule) nor an optimizer (ours is torch AdamW over the registry's groups).
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from qwenvl_train.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Start the process group (NCCL on GPUs, gloo on CPU) through DeepSpeed."""
    import deepspeed

    # DeepSpeed compiles a shared-memory comm op on first init (tens of seconds on CPU);
    # training never uses it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world > 1 or "MASTER_ADDR" in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    else:  # a plain `python -m` run: a one-process group on a free port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_bf16(cfg: TrainConfig) -> bool:
    """bf16 as the stage asks, on any device: DeepSpeed's bf16 mode (bf16 weights and
    activations, fp32 master weights and optimizer state) runs on CPU as well. The CPU
    demo (`scale=demo`) sets fp32."""
    return cfg.stage.precision == "bf16"


def check_device_support(cfg: TrainConfig) -> None:
    """Precision / kernel choices this machine or DeepSpeed cannot run; raises ConfigError
    naming the key (before the model is built)."""
    on_gpu = torch.cuda.is_available()
    if cfg.stage.precision == "fp16" and not on_gpu:
        raise ConfigError("stage.precision: fp16 needs a GPU (DeepSpeed has no fp16 on CPU); "
                          "use bf16 or fp32")
    if (uses_bf16(cfg) and cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1
            and cfg.parallel.grad_accum_dtype == "fp32"):
        raise ConfigError(
            "parallel.grad_accum_dtype: fp32 gradient accumulation under bf16 needs ZeRO "
            "(DeepSpeed accumulates in bf16 without it); set parallel.zero_stage=1 (the "
            "same memory at one rank) or parallel.grad_accum_dtype=bf16")
    if cfg.model.attn_implementation == "flex" and not on_gpu:
        raise ConfigError("model.attn_implementation: flex trains on CUDA only (PyTorch's "
                          "FlexAttention has no CPU backward); use auto or sdpa on CPU")


def zero_optimization(cfg: TrainConfig) -> dict:
    """The `zero_optimization` section DeepSpeed gets: ours, then `parallel.deepspeed`'s
    (also what the planner's buffer model reads, training/observe/memory.py)."""
    zero: dict = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage in (1, 2):
        # Reduce gradient buckets while backward still runs (ZeRO-3 overlaps by default).
        zero.update(overlap_comm=True)
    if cfg.parallel.zero_stage >= 2:
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    if cfg.parallel.zero_stage == 3:
        # Gather full weights into one file at save time is not needed: export gathers itself.
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    return _deep_merge(zero, dict(dict(cfg.parallel.deepspeed).get("zero_optimization") or {}))


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    check_device_support(cfg)
    accum = cfg.stage.grad_accumulation_steps(dp_size)
    bf16 = uses_bf16(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.stage.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.stage.micro_batch_size * accum * dp_size,
        "gradient_clipping": cfg.stage.optim.grad_clip,
        "zero_optimization": zero_optimization(cfg),
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": cfg.stage.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # our tracker logs; silence DeepSpeed's own prints
        "wall_clock_breakdown": False,
    }
    if bf16:
        # Where DeepSpeed sums micro-batch gradients (and, under ZeRO, reduces them).
        ds["data_types"] = {"grad_accum_dtype": cfg.parallel.grad_accum_dtype}
    return _deep_merge(ds, dict(cfg.parallel.deepspeed))


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out

