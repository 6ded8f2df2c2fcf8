"""The LM head and its cross-entropy, with or without the [tokens, vocab] logits tensor.

The plain path materialises fp32 logits for every label position ([N, 151,936]; 2.4 GiB at
4,096 tokens, and autograd keeps the log-softmax of the same size for backward). The
chunked path runs the head over `chunk` label positions at a time, computes each chunk's
fp32 softmax, and turns it into the gradients of the head's input and weight right away,
in the forward pass -- the loss is the graph's end, so the upstream gradient is a scalar
and scales them in backward. Peak extra memory: one [chunk, vocab] fp32 block (~256 MiB,
whatever the number of tokens) plus the gradients of the head's input ([N, hidden]) and,
when the head trains, of its weight (parameter-sized) held until backward. Same matmul
FLOPs as the plain path (forward, grad-input, grad-weight); no recomputation.

`LMHead` is transformers' `lm_head` (an nn.Linear; QwenVL swaps its class, so weight,
name and ZeRO-3 hooks stay those of the original module): `head(h)` gives logits as
before, `head(h, targets, chunked=...)` the summed and per-token losses. The loss runs
inside the head's own forward, which is where ZeRO-3 gathers the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Elements of one chunk's fp32 logits block: 2**26 (256 MiB) -> 441 tokens at 151,936.
LOSS_CHUNK_ELEMENTS = 1 << 26


def chunk_tokens(vocab_size: int) -> int:
    return max(1, LOSS_CHUNK_ELEMENTS // vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) -> (sum of CE, per-token CE fp32 [N]).

    Gradients are computed in forward (see the module docstring); backward only scales
    them by the incoming scalar gradient, in place, so it may run once."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h, t = hidden[start:stop], targets[start:stop, None]
            logits = F.linear(h, weight).float()  # [c, V], fp32 from here on
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            ce[start:stop] = (lse - logits.gather(1, t)).squeeze(1)
            if not (need_hidden or need_weight):
                continue
            # d CE / d logits = softmax - one_hot(target), built in place in the block.
            grad = logits.sub_(lse).exp_()
            grad.scatter_add_(1, t, grad.new_full(t.shape, -1.0))
            grad = grad.to(weight.dtype)
            if need_hidden:
                torch.mm(grad, weight, out=grad_hidden[start:stop])
            if need_weight:
                grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.used = False
        ctx.mark_non_differentiable(ce)
        return ce.sum(), ce

    @staticmethod
    def backward(ctx, grad_sum: torch.Tensor, _grad_ce: torch.Tensor | None):
        if ctx.used:
            raise RuntimeError("the chunked LM-head loss supports one backward pass")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_sum.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_sum.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 targets: torch.Tensor, chunk: int | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE and per-token CE (fp32) of `hidden @ weight.T` against `targets`,
    `chunk` tokens at a time (default: LOSS_CHUNK_ELEMENTS // vocab)."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


class LMHead(nn.Linear):
    """transformers' `lm_head` with a loss path; see the module docstring."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                chunked: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if targets is None:
            return super().forward(hidden)
        if self.bias is not None:
            raise ValueError("the LM-head loss expects a head without bias (Qwen has none)")
        if chunked:
            return chunked_linear_cross_entropy(hidden, self.weight, targets)
        logits = super().forward(hidden).float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce.sum(), ce
