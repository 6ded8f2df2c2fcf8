"""Measuring what the planner predicts: one training step (2 micro-batches + AdamW) of a
small model on the CPU under torch's MemTracker, with the production model, freezing and
optimizer groups, on synthetic packed batches (data/synthetic.py: rows full to seq_len, one
image per packed sample, a chosen number of label positions)."""

from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.hooks import RemovableHandle

from qwenvl_train.config import TrainConfig, load_config
from qwenvl_train.data.synthetic import synthetic_batch
from qwenvl_train.model import groups
from qwenvl_train.model.qwenvl import build_model
from qwenvl_train.training.observe.memory import Workload
from qwenvl_train.training.observe.plan import workload_of_batch
from qwenvl_train.training.optim import build_optimizer
from qwenvl_train.training.run import param_groups_of


class _NoHooks(dict):  # RemovableHandle keeps a weak reference to its hooks dict
    pass


SMALL_MODEL = [
    "model.vision.width=128", "model.vision.layers=2", "model.vision.heads=4",
    "model.vision.mlp_dim=512", "model.adapter.num_queries=64", "model.adapter.embed_dim=64",
    "model.adapter.heads=4", "model.llm.hidden_size=64", "model.llm.num_layers=2",
    "model.llm.num_heads=4", "model.llm.num_kv_heads=4", "model.llm.intermediate_size=176",
    "stage.precision=fp32", "model.attn_implementation=sdpa",
]


def small_config(*overrides: str) -> TrainConfig:
    return load_config(["model=tiny", *SMALL_MODEL, *overrides])


def make_batch(cfg: TrainConfig, rows: int, samples_per_row: int, labels_per_sample: int,
               seed: int = 0) -> tuple[dict, Workload]:
    """Rows of `seq_len` tokens packed with `samples_per_row` synthetic samples (one image,
    `labels_per_sample` labels each), and their Workload."""
    batch = synthetic_batch(rows, cfg.stage.seq_len, samples_per_row,
                            cfg.model.adapter.num_queries, cfg.stage.image_size,
                            labels_per_sample, seed=seed)
    return batch, workload_of_batch(batch)


def measure_step(cfg: TrainConfig, batches: list[dict]) -> dict[str, float]:
    """One optimizer step over `batches` (gradient accumulation) under MemTracker, with the
    optimizer state already there (as in every step after the first). Returns bytes:
    `backward_peak` (the peak before the optimizer step), `step_peak` (the whole step) and
    `states` (parameters + all gradients + optimizer state, exact)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.stage.image_size)
    if cfg.stage.precision == "bf16":
        model.to(torch.bfloat16)  # activations in bf16; the states are not DeepSpeed's here
    groups.set_trainable(model, cfg.stage.trainable, cfg.model.adapter.post_group)
    model.train()
    optim = cfg.stage.optim
    optimizer = build_optimizer(param_groups_of(cfg, model)[0], lr=optim.peak_lr,
                                betas=tuple(optim.betas), eps=optim.eps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # create the optimizer state without a forward pass
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    tracker, no_hooks = MemTracker(), _NoHooks()
    for p in model.parameters():
        if not p.requires_grad:
            # MemTracker hooks every parameter for its gradient, which a frozen one cannot
            # take; mark those as hooked already (no-op handles).
            tracker._param_to_grad_hook_handles[p] = (RemovableHandle(no_hooks),) * 2
    inputs = [t for b in batches for t in b.values() if torch.is_tensor(t)]
    tracker.track_external(model, optimizer, *inputs)
    with tracker:
        for batch in batches:
            model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids",
                                           "segment_ids", "images")}).loss.backward()
            tracker.reset_mod_stats()  # per-module stats hold one call; the peak stays
        backward_peak = _total(tracker)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_peak = _total(tracker)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    states = (sum(nbytes(p) for p in model.parameters()) + sum(nbytes(p) for p in trainable)
              + sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v)))
    return {"backward_peak": backward_peak, "step_peak": step_peak, "states": states}


def _total(tracker: MemTracker) -> float:
    peak = tracker.get_tracker_snapshot("peak")
    return float(sum(snap["Total"] for snap in peak.values()))
