"""A plain QwenVL as a DeepSpeed PipelineModule (pipeline parallelism, optionally with TP).

Layer chain, one layer per slot of the registry's `groups.pipeline_slots` (which modules
sit where; the ViT and adapter always on the first stage):
  0      VisionEmbedPipe  ViT + adapter + token embedding + image splicing (QwenVL.embed_inputs)
  1..n   DecoderPipe      one transformers decoder layer each (rotary per layer; the
                          attention mask / BlockMask built once per micro-batch and stage)
  n+1    HeadPipe         final norm + LM head + loss (QwenVL._loss)
Only tensors cross stages: the hidden state and one long tensor [B, L, 4] packing
position_ids, segment_ids, labels and task_ids (ints never get gradients, so the engine's
"float inputs require grad" rule cannot bite). The split is compute-balanced
(partition.py). A stage whose parameters are all frozen gets shape-(1,) trainable
anchors used as `h + 0 * anchor` (see `pipeline_param_groups`): DeepSpeed needs a non-empty
optimizer and a grad-requiring output per stage; losses and frozen weights are unchanged.
Parameter names map back to the plain model's through the same slots
(`named_parameters_original`), so the group registry, optimizer groups and exported
checkpoints are layout-independent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import PipelineModule
from torch import nn

from qwenvl_train.model import groups
from qwenvl_train.model.attention import BatchAttentionInputs, positions_from_segments
from qwenvl_train.model.qwenvl import QwenVL
from qwenvl_train.training.losses import task_loss_sums
from qwenvl_train.training.parallel.partition import PipelineSplit
from qwenvl_train.training.parallel.tensor_parallel import (
    broadcast_batches,
    gather_full_state_dict,
    load_full_state_dict,
)

log = logging.getLogger("qwenvl_train")
ANCHOR = "pipe_anchor"


class _Shell:
    """Duck-types the parts of QwenVL that embed_inputs/_loss use, so a stage reuses the
    model's own code without holding the other stages' modules."""

    encode_images = QwenVL.encode_images
    embed_inputs = QwenVL.embed_inputs
    _loss = QwenVL._loss

    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


class _LLMParts:
    def __init__(self, embed_tokens: nn.Module | None = None, lm_head: nn.Module | None = None):
        self.embed_tokens, self.lm_head = embed_tokens, lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens


class PipeLayer(nn.Module):
    """A pipeline layer holding the modules of one registry slot (`groups.pipeline_slots`)
    under their roles; `prefixes` maps each role back to the plain model's name prefix."""

    def __init__(self, model: QwenVL, slot: groups.PipeSlot) -> None:
        super().__init__()
        self.prefixes: dict[str, str] = {}
        for role, path in slot.modules.items():
            self.add_module(role, model.get_submodule(path))
            self.prefixes[role] = path + "."

    def new_anchor(self) -> nn.Parameter:
        if not hasattr(self, ANCHOR):
            self.pipe_anchor = nn.ParameterList()
        device = next(iter(self.state_dict().values()), torch.zeros(())).device
        self.pipe_anchor.append(nn.Parameter(torch.zeros(1, device=device)))
        return self.pipe_anchor[-1]

    def anchored(self, h: torch.Tensor) -> torch.Tensor:
        for anchor in getattr(self, ANCHOR, ()):
            h = h + (0 * anchor).to(h.dtype)
        return h


class VisionEmbedPipe(PipeLayer):
    """Roles vit, adapter, embed_tokens."""

    def __init__(self, model: QwenVL, slot: groups.PipeSlot) -> None:
        super().__init__(model, slot)
        self._shell = _Shell(vit=self.vit, adapter=self.adapter, num_queries=model.num_queries,
                             image_size=model.image_size, llm=_LLMParts(self.embed_tokens))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, images, position_ids, segment_ids, labels, task_ids = inputs
        h = self._shell.embed_inputs(input_ids, images)
        ints = torch.stack([position_ids, segment_ids, labels, task_ids], dim=-1)
        return self.anchored(h), ints


class DecoderPipe(PipeLayer):
    """Roles layer (one decoder layer) and rotary (buffers only; shared by the stage's
    layers)."""

    def __init__(self, model: QwenVL, slot: groups.PipeSlot,
                 attention_inputs: BatchAttentionInputs) -> None:
        super().__init__(model, slot)
        self.attention_inputs = attention_inputs  # shared by all decoder layers

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        h, ints = inputs
        h = self.anchored(h)
        positions, segments = ints[..., 0], ints[..., 1]
        # The same inputs Qwen2Model hands its layers (a 4D mask passes through unchanged);
        # `ints` travels unchanged through the stage's layers, so they share one build.
        extra = self.attention_inputs(ints, segments, h.dtype)
        mask = extra.pop("attention_mask", None)
        rope = self.rotary(h, positions)
        h = self.layer(h, attention_mask=mask, position_ids=positions,
                       position_embeddings=rope, **extra)
        return h, ints


class HeadPipe(PipeLayer):
    """Roles norm and lm_head."""

    def __init__(self, model: QwenVL, slot: groups.PipeSlot) -> None:
        super().__init__(model, slot)
        self._shell = _Shell(llm=_LLMParts(lm_head=self.lm_head), chunked_loss=model.chunked_loss)
        self.task_sums = task_loss_sums(device=torch.device("cpu"))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, ints = inputs
        h = self.norm(self.anchored(h))
        labels, segments, tasks = ints[..., 2], ints[..., 1], ints[..., 3]
        out = self._shell._loss(h, labels, segments)
        self.task_sums = self.task_sums.to(h.device) + task_loss_sums(out.token_loss, tasks,
                                                                        labels)
        return out.loss


def pipeline_layers(model: QwenVL) -> list[PipeLayer]:
    first, *decoders, last = groups.pipeline_slots(model.config.llm.num_layers)
    attention_inputs = BatchAttentionInputs(model.attn_implementation)
    return [VisionEmbedPipe(model, first),
            *(DecoderPipe(model, s, attention_inputs) for s in decoders), HeadPipe(model, last)]


class QwenVLPipe(PipelineModule):
    """PipelineModule with a precomputed split instead of DeepSpeed's partition methods."""

    def __init__(self, layers: list[PipeLayer], parts: list[int], topology) -> None:
        object.__setattr__(self, "_fixed_parts", list(parts))
        super().__init__(layers, topology=topology, loss_fn=None, partition_method="uniform",
                         dynamic_shape=True,  # rows / image counts may change per batch
                         seed_fn=lambda s: torch.manual_seed(int(s)))

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = list(self._fixed_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline_module(model: QwenVL, topology, split: PipelineSplit) -> QwenVLPipe:
    """Wrap a plain (frozen per stage config, possibly tensor-parallel) model."""
    layers = pipeline_layers(model)
    parts = split.parts
    if len(layers) != len(split.layer_cost) or parts[-1] != len(layers) or parts[0] != 0 or any(
            a >= b for a, b in zip(parts, parts[1:], strict=False)):
        raise ValueError(f"bad split {parts} for a pipeline of {len(layers)} layers")
    pipe = QwenVLPipe(layers, split.parts, topology)
    # Drop this rank's references to other stages' layers (the caller drops `model`).
    pipe._layer_specs = [layer if pipe._local_start <= i < pipe._local_stop else None
                         for i, layer in enumerate(pipe._layer_specs)]
    if dist.get_rank() == 0:
        log.info("pipeline split (training FLOPs per row):\n%s", split.describe())
    return pipe


# ---- names, optimizer groups, weights ----------------------------------------------------
def original_name(pipe: nn.Module, name: str) -> str | None:
    """`5.layer.mlp.up_proj.weight` -> `llm.model.layers.4.mlp.up_proj.weight`; None for an
    anchor."""
    idx, child, *rest = name.split(".", 2)
    if child == ANCHOR:
        return None
    return pipe._modules[idx].prefixes[child] + (rest[0] if rest else "")


def named_parameters_original(pipe: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, param in pipe.named_parameters():
        original = original_name(pipe, name)
        if original is not None:
            yield original, param


class OriginalNames:
    """A view with the plain model's parameter names (for optim.build_param_groups and the
    group registry); anchors are left out (see `pipeline_param_groups`)."""

    def __init__(self, pipe: nn.Module) -> None:
        self.pipe = pipe

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return named_parameters_original(self.pipe)


def pipeline_param_groups(pipe: nn.Module, build_groups: Callable[[Any], list[dict]]) -> list[dict]:
    """Optimizer groups of this rank's stage, with the same group list on every stage.

    `build_groups(model_like)` is the trainer's builder (e.g. optim.build_param_groups); it
    sees the plain model's names. DeepSpeed's ZeRO-1 norm runs one collective per optimizer
    group over all stages, so a group another stage has and this one lacks gets an anchor:
    a zero shape-(1,) parameter used as `h + 0 * anchor` (gradient 0, never moves). A stage
    without trainable parameters is thereby trainable too, as DeepSpeed requires. Call it
    before deepspeed.initialize (anchors are new module parameters)."""
    groups = build_groups(OriginalNames(pipe))
    mine = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in groups}
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    holder = pipe.forward_funcs[0]
    for label in sorted({k for d in everyone for k in d} - set(mine)):
        settings = next(d[label] for d in everyone if label in d)
        groups.append({**settings, "params": [holder.new_anchor()]})
    return sorted(groups, key=lambda g: g["name"])


def gather_pipeline_state_dict(pipe: nn.Module, grid) -> dict[str, torch.Tensor] | None:
    """Full plain-model state dict on global rank 0 (None elsewhere). Collective."""
    local = gather_full_state_dict(pipe, grid.get_slice_parallel_group())
    mine: dict[str, torch.Tensor] = {}
    if grid.get_data_parallel_rank() == 0 and grid.get_slice_parallel_rank() == 0:
        for name, tensor in local.items():
            original = original_name(pipe, name)
            if original is not None:
                mine[original] = tensor.cpu()
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, out, dst=0)
    if out is None:
        return None
    return {k: v for part in out for k, v in part.items()}


def load_pipeline_state_dict(pipe: nn.Module, full: dict[str, torch.Tensor], grid) -> None:
    """Load plain-model weights into this rank's stage (sliced for tensor parallelism)."""
    local = {}
    for name in pipe.state_dict():
        original = original_name(pipe, name)
        local[name] = full[original] if original is not None else pipe.state_dict()[name]
    load_full_state_dict(pipe, local, grid.get_slice_parallel_group())


# ---- data and the train step -------------------------------------------------------------
def pipe_inputs(batch: dict) -> tuple[torch.Tensor, ...]:
    """A trainer batch dict -> the first stage's input tuple."""
    ids = batch["input_ids"]
    segments = batch.get("segment_ids")
    if segments is None:
        segments = torch.ones_like(ids)
    positions = batch.get("position_ids")
    if positions is None:
        positions = positions_from_segments(segments)
    tasks = batch.get("task_ids")
    if tasks is None:
        tasks = torch.zeros_like(ids)
    return (ids, batch["images"], positions, segments, batch["labels"], tasks)


class PipeBatches:
    """Per-rank micro-batch iterator for `engine.train_batch`.

    The reader (first stage, tensor rank 0; see topology.reads_data) pulls from the loader,
    its tensor peers receive the same batch, the last stage gets placeholders (labels travel
    through the pipeline). `consumed` keeps the raw batches (keys, counts) of the reader."""

    def __init__(self, batches: Iterator[dict] | None, grid) -> None:
        self.first = grid.get_stage_id() == 0
        self.consumed: list[dict] = []
        if self.first and grid.get_slice_parallel_world_size() > 1:
            src = grid.stage_to_global(0, model=0)
            batches = broadcast_batches(batches, grid.get_slice_parallel_group(), src)
        self.batches = batches

    def __iter__(self) -> PipeBatches:
        return self

    def __next__(self):
        if not self.first:
            return None, None
        batch = next(self.batches)
        self.consumed.append(batch)
        return pipe_inputs(batch), None


def pipeline_train_step(engine, data: PipeBatches) -> dict:
    """One optimizer step (gradient_accumulation_steps micro-batches through the pipe).

    Returns, on every rank: `loss` (mean over micro-batches and data-parallel replicas),
    `finite`, `task_sums` [tasks, 2] (token loss, tokens; summed over replicas),
    `grad_norm` (pre-clip), `skipped` (update skipped: non-finite gradients), and
    `batches`, the raw batches this rank read (keys for NaN reports; reader ranks only)."""
    pipe, grid = engine.module, engine.grid
    head = next((m for m in pipe.forward_funcs if isinstance(m, HeadPipe)), None)
    if head is not None:
        head.task_sums = task_loss_sums(device=engine.device)
    data.consumed = []
    loss = engine.train_batch(data_iter=data)
    sums = (head.task_sums.clone() if head is not None
            else task_loss_sums(device=engine.device))
    if grid.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=grid.get_data_parallel_group())
    if grid.get_pipe_parallel_world_size() > 1:
        src = grid.stage_to_global(grid.get_pipe_parallel_world_size() - 1)
        dist.broadcast(sums, src=src, group=grid.get_pipe_parallel_group())
    norm = engine.get_global_grad_norm()
    # ZeRO-1 skips the update by itself when the gradient norm is not finite (NaN/inf
    # loss): nothing moves, the optimizer's step count included.
    return {"loss": float(loss), "finite": math.isfinite(float(loss)), "task_sums": sums,
            "grad_norm": norm, "skipped": norm is not None and not math.isfinite(float(norm)),
            "batches": data.consumed}
