"""Megatron-style tensor parallelism applied to a plain (already initialised) model.

Which linears split, and how, is the registry's (`groups.tensor_parallel_plan`): the
attention and MLP of every ViT block and LLM decoder layer. A column-parallel linear keeps a
contiguous slice of output rows (whole heads, or a slice of the MLP width); a row-parallel
linear keeps the matching slice of input columns and sums the partial outputs over the
tensor-parallel group. Per attention/MLP block that is one all-reduce forward (after the
row-parallel layer) and one backward (before the column-parallel layers). Everything else
(norms, embeddings, adapter, LM head) stays replicated and gets identical gradients on every
tensor rank.

Sharded parameters carry `tensor_model_parallel=True` and `partition_dim`, which is how
DeepSpeed's ZeRO-1/2 norm code counts them once per tensor rank (replicated ones only on
rank 0) and how `gather_full_state_dict` / `load_full_state_dict` map to full weights.

LoRA (model/lora.py) on a split linear splits with it: a column-parallel linear keeps the
rows of B that match its weight rows (A replicated; the rank-r activations enter the tensor
region like x does), a row-parallel one the columns of A that match its input slice (B
replicated; the partial rank-r products are summed before B). Each rank's LoRA update is
then exactly its slice of the unsplit one, and replicated A/B get identical gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwenvl_train.model import groups
from qwenvl_train.model.lora import attach_lora, is_lora_linear
from qwenvl_train.training.parallel.config import ParallelConfig


class _CopyToTensorRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (each rank's slice of
    the following column-parallel layer contributes part of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorRegion(torch.autograd.Function):
    """All-reduce forward (sum of partial products); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _mark(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim


def _shard(t: torch.Tensor, dim: int, rank: int, world: int) -> nn.Parameter:
    piece = t.detach().chunk(world, dim=dim)[rank].clone().contiguous()
    return nn.Parameter(piece, requires_grad=t.requires_grad)


class ColumnParallelLinear(nn.Linear):
    """y_local = x @ W[rows of this rank].T (+ b local); output stays split."""

    def __init__(self, linear: nn.Linear, group, rank: int, world: int) -> None:
        out = linear.out_features // world
        super().__init__(linear.in_features, out, bias=linear.bias is not None, device="meta")
        self.group = group
        self.weight = _shard(linear.weight, 0, rank, world)
        _mark(self.weight, 0)
        if linear.bias is not None:
            self.bias = _shard(linear.bias, 0, rank, world)
            _mark(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTensorRegion.apply(x, self.group), self.weight, self.bias)

    def lora_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """LoRA: the (replicated) x A^T enters the region before the local rows of B."""
        return _CopyToTensorRegion.apply(h, self.group)


class RowParallelLinear(nn.Linear):
    """y = sum_ranks x_local @ W[:, cols of this rank].T, then + b (replicated)."""

    def __init__(self, linear: nn.Linear, group, rank: int, world: int) -> None:
        inp = linear.in_features // world
        super().__init__(inp, linear.out_features, bias=linear.bias is not None, device="meta")
        self.group = group
        self.weight = _shard(linear.weight, 1, rank, world)
        _mark(self.weight, 1)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(),
                                     requires_grad=linear.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ReduceFromTensorRegion.apply(F.linear(x, self.weight), self.group)
        # The bias is added once, after the sum, so it is not counted tp times.
        return out if self.bias is None else out + self.bias

    def lora_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """LoRA: x_local A_local^T summed over ranks, before the replicated B."""
        return _ReduceFromTensorRegion.apply(h, self.group)


_STYLES = {groups.COLUMN: ColumnParallelLinear, groups.ROW: RowParallelLinear}
# The LoRA matrix each style splits, and along which dimension (the other is replicated).
_LORA_SPLIT = {groups.COLUMN: (groups.LORA_B, 0), groups.ROW: (groups.LORA_A, 1)}


def _split_lora(src: nn.Module, dst: nn.Linear, style: str, rank: int, world: int) -> None:
    """Carry `src`'s LoRA matrices over to its tensor-parallel replacement `dst`."""
    split_name, dim = _LORA_SPLIT[style]
    mats = {}
    for name in (groups.LORA_A, groups.LORA_B):
        tensor = getattr(src, name)
        if name == split_name:
            mats[name] = _shard(tensor, dim, rank, world)
            _mark(mats[name], dim)
        else:
            mats[name] = nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
    attach_lora(dst, mats[groups.LORA_A], mats[groups.LORA_B], src.lora_scale, src.lora_dropout)


def apply_tensor_parallel(model: nn.Module, group) -> nn.Module:
    """Shard the linears of `groups.tensor_parallel_plan` (attention and MLP of every ViT
    block and LLM decoder layer) of a QwenVL over `group`, in place.

    Every rank must hold the same full weights beforehand (same seed or same checkpoint);
    parameter names are unchanged. HF Qwen2 attention infers the local head count from the
    projection width (`view(..., -1, head_dim)`) and keeps the q/kv ratio, so swapping its
    linears is enough; our ViT attention is told its local head count.
    """
    world = dist.get_world_size(group=group)
    if world == 1:
        return model
    rank = dist.get_rank(group=group)
    # Heads and MLP widths must split evenly: the config's rule, also for direct callers.
    ParallelConfig(tp=world).validate(model=model.config)
    for path, style in groups.tensor_parallel_plan(model.config).items():
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        linear = getattr(owner, name)
        split = _STYLES[style](linear, group, rank, world)
        if is_lora_linear(linear):
            _split_lora(linear, split, style, rank, world)
        setattr(owner, name, split)
    for i in range(model.config.vision.layers):
        # in_proj rows are grouped per head ([q_h | k_h | v_h]), so a contiguous row slice
        # is a set of whole heads.
        model.get_submodule(f"{groups.vit_block(i)}.{groups.VIT_BLOCK.attn}").heads //= world
    return model


def _params_by_name(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(remove_duplicate=False))


@torch.no_grad()
def gather_full_state_dict(module: nn.Module, group) -> dict[str, torch.Tensor]:
    """The module's state dict with every sharded tensor all-gathered to its full shape.

    Collective over `group`: every tensor rank must call it (all get the full dict)."""
    params = _params_by_name(module)
    world = dist.get_world_size(group=group) if group is not None else 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        param = params.get(name)
        if world > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        out[name] = tensor.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], group, strict: bool = True
) -> None:
    """Load full (unsharded) weights into a tensor-parallel module by slicing."""
    params = _params_by_name(module)
    world = dist.get_world_size(group=group) if group is not None else 1
    rank = dist.get_rank(group=group) if group is not None else 0
    local = {}
    for name, tensor in state_dict.items():
        param = params.get(name)
        if world > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
            tensor = tensor.chunk(world, dim=param.partition_dim)[rank]
        local[name] = tensor
    module.load_state_dict(local, strict=strict)


def broadcast_batches(batches: Iterator | None, group, src: int) -> Iterator:
    """Yield the batches of the reading rank `src` (global rank) on every rank of `group`.

    Tensor ranks must see identical inputs; one rank reads (and decodes images), the others
    receive the batch, so the data is read once per model replica."""
    me = dist.get_rank()
    while True:
        item = [next(batches) if me == src else None]
        dist.broadcast_object_list(item, src=src, group=group)
        yield item[0]
