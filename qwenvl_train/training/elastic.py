"""Elastic data parallelism, training side: the readers' exchange of micro-batches, the cost
estimate that balancing uses, and the launch check of what a resume may change.

The data side (data/global_order.py, data/balance.py, data/loader.py) fixes the run's
micro-batches independently of the layout and decides, per step, which data-parallel rank
trains which. This module does the communication, over a gloo group of the reading ranks
(one per model replica: pipeline/tensor peers receive from their reader), on CPU tensors
whatever the training backend:

* `all_costs`: one all-reduce of the step's per-micro-batch (cost, 1) pairs, each filled
  by the rank that read it: 16 bytes x M micro-batches;
* `move`: point-to-point sends of exactly the micro-batches that change owner (their
  pickled tensors, images still uint8), sizes first; nothing else moves;
* `gather`: the virtual streams' positions at a checkpoint (all_gather_object).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from qwenvl_train.checks import ConfigError
from qwenvl_train.data.stream import DataError
from qwenvl_train.training import checkpoint as ckpt
from qwenvl_train.training.observe import flops
from qwenvl_train.training.relayout import describe, readable

if TYPE_CHECKING:
    from qwenvl_train.config import TrainConfig


class ReaderExchange:
    """Collectives over the data-parallel readers (the loader's `Exchange`)."""

    def __init__(self, group, ranks: list[int], dp_rank: int, layout: dict):
        self.group, self.ranks, self.dp_rank, self.layout = group, ranks, dp_rank, layout
        self.moved_bytes = 0  # payload bytes this rank sent (cumulative)
        self.moved = 0  # micro-batches this rank sent (cumulative)

    def all_costs(self, first: int, count: int, local: dict[int, float]) -> list[float]:
        table = torch.zeros(count, 2, dtype=torch.float64)
        for m, c in local.items():
            table[m - first] = torch.tensor([c, 1.0], dtype=torch.float64)
        dist.all_reduce(table, group=self.group)  # exact: every entry has one writer
        if not bool((table[:, 1] == 1).all()):
            bad = (table[:, 1] != 1).nonzero().flatten()[:8].add(first).tolist()
            raise DataError(f"micro-batches {bad} were read by none or several ranks")
        return table[:, 0].tolist()

    def move(self, moves: list[tuple[int, int, int]], batches: dict[int, dict]
             ) -> dict[int, dict]:
        me = self.dp_rank
        first = min((m for m, _, _ in moves), default=0)
        out = {m: _pack(batches[m]) for m, src, _ in moves if src == me}
        sizes = {m: torch.zeros(1, dtype=torch.int64) for m, _, dst in moves if dst == me}
        sends = [(m, dst) for m, src, dst in moves if src == me]
        recvs = [(m, src) for m, src, dst in moves if dst == me]
        self._p2p([(torch.tensor([out[m].numel()]), dst, m - first) for m, dst in sends],
                  [(sizes[m], src, m - first) for m, src in recvs])
        bufs = {m: torch.empty(int(sizes[m]), dtype=torch.uint8) for m, _ in recvs}
        self._p2p([(out[m], dst, m - first) for m, dst in sends],
                  [(bufs[m], src, m - first) for m, src in recvs])
        self.moved += len(sends)
        self.moved_bytes += sum(int(t.numel()) for t in out.values())
        return {m: pickle.loads(bufs[m].numpy().tobytes()) for m, _ in recvs}

    def _p2p(self, sends: list[tuple[torch.Tensor, int, int]],
             recvs: list[tuple[torch.Tensor, int, int]]) -> None:
        reqs = [dist.isend(t, self.ranks[d], group=self.group, tag=tag) for t, d, tag in sends]
        reqs += [dist.irecv(t, self.ranks[s], group=self.group, tag=tag) for t, s, tag in recvs]
        for req in reqs:
            req.wait()

    def gather(self, obj: dict) -> list[dict]:
        out: list = [None] * len(self.ranks)
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _pack(batch: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(batch, protocol=5)), dtype=torch.uint8)


def build_exchange(cfg: TrainConfig, par) -> ReaderExchange | None:
    """Collective (every rank calls it): the readers' gloo group; the exchange on readers,
    None elsewhere. `par` is the layout (training/parallel/parallelize.py)."""
    who: list = [None] * dist.get_world_size()
    dist.all_gather_object(who, (bool(par.reads_data), int(par.dp_rank)))
    ranks = [r for r, _ in sorted(((r, d) for r, (reads, d) in enumerate(who) if reads),
                                  key=lambda x: x[1])]
    group = dist.new_group(ranks, backend="gloo") if len(ranks) > 1 else None
    if not par.reads_data:
        return None
    return ReaderExchange(group, ranks, int(par.dp_rank), layout_of(cfg, par))


def layout_of(cfg: TrainConfig, par) -> dict:
    """The layout a checkpoint records (`data_state.json`) and a resume compares with."""
    return {"world_size": dist.get_world_size(), "pp": par.sizes.pp, "tp": par.sizes.tp,
            "dp": par.sizes.dp, "zero_stage": int(cfg.parallel.zero_stage),
            "rank_maps": _readable(cfg)}


def _readable(cfg: TrainConfig) -> bool:
    """Whether this run's checkpoints can be re-partitioned (training/relayout.py)."""
    return readable(int(cfg.parallel.zero_stage), cfg.stage.precision != "fp32")


def micro_batch_cost(cfg: TrainConfig) -> Callable[[dict], float] | None:
    """Estimated training FLOPs of one micro-batch (the MFU formula of observe/flops.py, as
    the throughput meter applies it), or None when `data.balance` is off. A micro-batch
    without images still runs the vision path on one dummy image, so it counts one."""
    if not cfg.data.balance:
        return None
    stage, model = cfg.stage, cfg.model

    def cost(batch: dict) -> float:
        real = batch["num_real_tokens"]
        return flops.step_flops(
            model, stage.image_size, int(batch["input_ids"].numel()),
            max(1, int(batch["num_images"])), stage.seq_len, stage.trainable,
            loss_tokens=batch["num_loss_tokens"],
            segment_len=batch["seg_sq_tokens"] / real if real else None)

    return cost


# Fingerprint entries of the data state (data/stream.py:LoaderSpec) -> the config key.
_CONFIG_KEYS = {
    "root": "data.root", "sources": "data.sources", "template": "stage.template",
    "image_size": "stage.image_size", "seq_len": "stage.seq_len", "pack": "stage.pack",
    "num_image_tokens": "model.adapter.num_queries", "seed": "seed",
    "micro_batch_size": "stage.micro_batch_size", "micro_per_step": "stage.global_batch_size",
    "virtual_streams": "data.virtual_streams", "shuffle": "data.shuffle",
    "max_image_pixels": "data.max_image_pixels", "pack_buffer": "data.pack_buffer",
    "pad_to_multiple_of": "data.pad_to_multiple_of",
}


def check_resume(cfg: TrainConfig, world_size: int, tag: str | None = None) -> None:
    """Refuse, before any process group starts, a resume that the data order cannot
    honour: one that changes what the global order depends on (virtual streams, global and
    micro batch, sequence length, sources, ...) or a layout that its model/optimizer files
    cannot be re-partitioned for (training/relayout.py). Raises ConfigError naming the key
    and the numbers. (That the virtual streams cover this launch's readers is
    `global_order.check_cover`'s, torch-free; `config.validate_launch` runs both.) The
    checkpoint is `tag`, by default the one a resume will pick (`checkpoint.resume_candidate`:
    a damaged newest is skipped as the checkpoint.on_damaged=fallback resume skips it)."""
    from qwenvl_train.data.loader import loader_spec
    from qwenvl_train.training.parallel.topology import validate_parallel

    sizes = validate_parallel(cfg.parallel, world_size)
    if cfg.resume != "auto":
        return
    try:
        if tag is None:
            tag = ckpt.resume_candidate(cfg.run_dir, cfg.checkpoint.on_damaged)
        saved = ckpt.load_data_state(cfg.run_dir, tag) if tag else {}
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"resume: {e}") from None
    if not saved:
        return
    where = f"the checkpoint {ckpt.checkpoint_dir(cfg.run_dir) / tag}"
    try:
        now = loader_spec(
            cfg.data, template=cfg.stage.template, image_size=cfg.stage.image_size,
            seq_len=cfg.stage.seq_len, pack=cfg.stage.pack,
            num_image_tokens=cfg.model.adapter.num_queries, dp_rank=0, dp_size=1,
            micro_batch_size=cfg.stage.micro_batch_size, seed=cfg.seed, num_workers=0,
            global_batch_size=cfg.stage.global_batch_size).fingerprint()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    was = saved.get("fingerprint", {})
    for key in now:
        if now[key] != was.get(key):
            old, new = was.get(key), now[key]
            if key == "micro_per_step":
                old, new = old * was["micro_batch_size"], new * now["micro_batch_size"]
            raise ConfigError(
                f"{_CONFIG_KEYS.get(key, key)}: {where} was written with {old!r}, this run "
                f"has {new!r}; the run's sample order depends on it. Resume with the saved "
                "value, or start a new run_dir (init_from= the export for new weights).")
    _check_model_layout(saved.get("layout", {}), sizes, int(cfg.parallel.zero_stage), where,
                        _readable(cfg))
    _check_random_frozen(cfg, saved.get("layout", {}), where)


def _check_random_frozen(cfg: TrainConfig, was: dict, where: str) -> None:
    """Frozen parts are not in checkpoints: a resume rebuilds them. Randomly initialised ones
    (no weights reach them) come out differently under deepspeed.zero.Init than in a plain
    build, so a resume across the ZeRO-3 boundary would train next to other frozen weights."""
    from qwenvl_train.model.source_config import frozen_random_parts

    zero = int(cfg.parallel.zero_stage)
    if not was or (was["zero_stage"] == 3) == (zero == 3):
        return
    random = frozen_random_parts(cfg.model, cfg.stage.trainable, cfg.init_from)
    if random:
        raise ConfigError(
            f"parallel.zero_stage: {where} was written with ZeRO-{was['zero_stage']}, this run "
            f"has ZeRO-{zero}; its frozen part(s) {', '.join(random)} are randomly initialised "
            "(no weights reach them), and deepspeed.zero.Init draws them differently from a "
            f"plain build. Resume with parallel.zero_stage={was['zero_stage']}, or load those "
            "parts from weights (model.weights.*, init_from)")


def _check_model_layout(was: dict, sizes, zero: int, where: str, readable_now: bool) -> None:
    """Which layout changes the model/optimizer files can follow: any, through
    training/relayout.py, between layouts whose files it reads (every ZeRO stage; not
    DeepSpeed's bf16/fp16 wrappers without ZeRO); ZeRO-0 under another dp size through
    DeepSpeed itself."""
    if not was:
        return
    old = (was["pp"], was["tp"], was["dp"], was["zero_stage"])
    if old == (sizes.pp, sizes.tp, sizes.dp, zero):
        return
    if was["zero_stage"] == zero == 0 and old[:2] == (sizes.pp, sizes.tp):
        return
    if was.get("rank_maps") and readable_now:
        return
    if not readable_now or "rank_maps" in was:  # recorded, and false: a bf16/fp16 ZeRO-0 run
        reason = ("bf16/fp16 without ZeRO keeps DeepSpeed's own flat optimizer state, which "
                  "is not re-partitioned (use parallel.zero_stage >= 1, or fp32)")
    else:
        reason = "it was written before checkpoints recorded their parameter maps"
    now = {"pp": sizes.pp, "tp": sizes.tp, "dp": sizes.dp, "zero_stage": zero}
    raise ConfigError(
        f"parallel: {where} was written with {describe(was)}, this run has {describe(now)}; "
        f"{reason}. Resume with parallel.pp={was['pp']} parallel.tp={was['tp']} "
        f"parallel.zero_stage={was['zero_stage']} on {was['pp'] * was['tp'] * was['dp']} "
        "processes, or start a new run_dir with init_from")
