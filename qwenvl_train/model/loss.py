"""The LM head and its cross-entropy, with or without the [tokens, vocab] logits tensor.

The plain path materialises fp32 logits for every label position ([N, 151,936]; 2.4 GiB at
4,096 tokens, and autograd keeps the log-softmax of the same size for backward). The
chunked path runs the head over `chunk` label positions at a time, computes each chunk's
fp32 softmax, and turns it into the gradients of the head's input and weight right away,
in the forward pass -- the loss is the graph's end, so the upstream gradient is a scalar
and scales them in backward. Peak extra memory: one [chunk, vocab] fp32 block (~256 MiB,
whatever the number of tokens; with a bf16 head, + its bf16 copy) plus the gradients of
the head's input ([N, hidden]) and, when the head trains, of its weight (parameter-sized)
held until backward. Same matmul FLOPs as the plain path (forward, grad-input,
grad-weight); no recomputation.

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
            ce[start:stop] = _chunk_loss(
                hidden[start:stop], weight, targets[start:stop, None],
                grad_hidden[start:stop] if need_hidden else None, grad_weight)
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


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor,
                grad_hidden_out: torch.Tensor | None, grad_weight: torch.Tensor | None
                ) -> torch.Tensor:
    """CE [c] of one chunk; writes its gradient of `h` into `grad_hidden_out` and adds its
    gradient of `weight` into `grad_weight` (each when given). The softmax is built in
    place in the fp32 logits block (`logsumexp` would allocate a second [c, V] block), and
    the blocks are freed on return, before the next chunk's: at most one fp32 [c, V] block
    plus its copy in the weight's dtype (bf16) exist at once."""
    logits = F.linear(h, weight).float()  # [c, V], fp32 from here on
    target_logit = logits.gather(1, t)
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()  # in place: `logits` now holds exp(logit - max)
    total = probs.sum(dim=-1, keepdim=True)
    ce = (total.log() + top - target_logit).squeeze(1)
    if grad_hidden_out is None and grad_weight is None:
        return ce
    # d CE / d logits = softmax - one_hot(target)
    probs.div_(total).scatter_add_(1, t, probs.new_full(t.shape, -1.0))
    grad = probs.to(weight.dtype)
    del logits, probs  # the fp32 block (a no-op when the weight is fp32: the same tensor)
    if grad_hidden_out is not None:
        torch.mm(grad, weight, out=grad_hidden_out)
    if grad_weight is not None:
        grad_weight.addmm_(grad.t(), h)
    return ce


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
