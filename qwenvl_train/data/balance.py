"""Compute-balanced assignment of a step's micro-batches to data-parallel ranks.

The set of micro-batches of a step is fixed by the global order (global_order.py); only
who trains which is decided here. Every rank must get exactly M / dp of them, and a
rank's step takes as long as the sum of its micro-batches' estimated costs, so the step
waits for the most loaded rank. `assign` starts from the readers (no data moves) and
improves the worst rank by swaps, so only what buys balance changes owner:

1. counts: while a rank read more than its share, it hands the micro-batch that best
   halves the gap to the least loaded rank short of its share (only when dp does not
   divide the number of virtual streams);
2. swaps: the most loaded rank swaps one micro-batch with the least loaded rank that
   has a pair (a, b) with 0 < cost(a) - cost(b) < gap, choosing the difference nearest
   gap / 2; repeated until the most loaded rank is within `tolerance` of the mean or no
   swap helps. Each swap strictly lowers the pair's maximum, so it ends; the result is
   the earliest assignment with the lowest maximum (swaps that did not lower it undone).

Pure and deterministic (plain float arithmetic in a fixed order): every rank computes the
same assignment from the same costs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

TOLERANCE = 0.005  # stop once the slowest rank is within 0.5% of the mean


def assign(costs: Sequence[float], producers: Sequence[int], ranks: int, *,
           tolerance: float = TOLERANCE, max_swaps: int | None = None) -> list[int]:
    """Owner rank of each micro-batch (index = position in the step)."""
    n = len(costs)
    if n % ranks:
        raise ValueError(f"{n} micro-batches do not divide over {ranks} ranks")
    share = n // ranks
    owner = list(producers)
    members: list[list[int]] = [[] for _ in range(ranks)]
    for i, r in enumerate(owner):
        members[r].append(i)
    load = [sum(costs[i] for i in mem) for mem in members]

    def move(i: int, src: int, dst: int) -> None:
        members[src].remove(i)
        members[dst].append(i)
        load[src] -= costs[i]
        load[dst] += costs[i]
        owner[i] = dst

    while True:  # 1. counts
        over = [r for r in range(ranks) if len(members[r]) > share]
        if not over:
            break
        src = max(over, key=lambda r: (load[r], -r))
        dst = min((r for r in range(ranks) if len(members[r]) < share),
                  key=lambda r: (load[r], r))
        half = (load[src] - load[dst]) / 2
        move(min(members[src], key=lambda i: (abs(costs[i] - half), i)), src, dst)

    mean = sum(load) / ranks
    best, best_max = list(owner), max(load)
    for _ in range(4 * n if max_swaps is None else max_swaps):  # 2. swaps
        hi = max(range(ranks), key=lambda r: (load[r], -r))
        if load[hi] <= mean * (1 + tolerance):
            break
        for lo in sorted(range(ranks), key=lambda r: (load[r], r)):
            if lo == hi:
                continue
            pair = _best_swap(members[hi], members[lo], costs, load[hi] - load[lo])
            if pair is not None:
                a, b = pair
                move(a, hi, lo)
                move(b, lo, hi)
                break
        else:
            break
        if max(load) < best_max * (1 - 1e-9):
            best, best_max = list(owner), max(load)
    # Swaps that only lowered one of several equally loaded ranks bought nothing: the
    # first assignment reaching the final maximum moves the least.
    return best


def _best_swap(high: list[int], low: list[int], costs: Sequence[float],
               gap: float) -> tuple[int, int] | None:
    """(a in high, b in low) with 0 < cost[a] - cost[b] < gap, difference nearest gap/2."""
    by_cost = sorted(low, key=lambda i: (costs[i], i))
    values = [costs[i] for i in by_cost]
    best, best_err = None, gap / 2
    for a in sorted(high):
        want = costs[a] - gap / 2  # the cost of b that halves the gap
        k = bisect.bisect_left(values, want)
        for j in (k - 1, k):
            if 0 <= j < len(by_cost):
                d = costs[a] - values[j]
                err = abs(d - gap / 2)
                if 0 < d < gap and err < best_err:
                    best, best_err = (a, by_cost[j]), err
    return best


def rank_loads(costs: Sequence[float], owner: Sequence[int], ranks: int) -> list[float]:
    load = [0.0] * ranks
    for c, r in zip(costs, owner, strict=True):
        load[r] += c
    return load


def straggler_ratio(costs: Sequence[float], owner: Sequence[int], ranks: int) -> float:
    """max rank cost / mean rank cost of one step (1.0 = perfectly balanced)."""
    load = rank_loads(costs, owner, ranks)
    mean = sum(load) / ranks
    return max(load) / mean if mean > 0 else 1.0
