"""The global order's rule (who reads each micro-batch) and the balanced assignment."""

from __future__ import annotations

import random

import pytest

from qwenvl_train.data.balance import assign, rank_loads, straggler_ratio
from qwenvl_train.data.global_order import GlobalOrder, check_cover


@pytest.mark.parametrize("v,dp,workers", [(8, 4, 2), (8, 2, 1), (8, 3, 2), (6, 4, 1)])
def test_every_micro_batch_is_read_once_and_steps_align_with_workers(v, dp, workers):
    order = GlobalOrder(virtual_streams=v, micro_per_step=12, dp_size=dp, workers=workers)
    for step in range(5):
        readers = {}
        for rank in range(dp):
            per_worker = [order.produced_by(step, rank, w) for w in range(workers)]
            assert max(map(len, per_worker)) == order.slots(step, rank)
            for w, ms in enumerate(per_worker):
                for m in ms:
                    assert m not in readers
                    readers[m] = (rank, w)
                    assert order.producer(m) == rank and order.stream(m) in order.streams_of(
                        rank, w)
        assert sorted(readers) == list(order.step_micro(step))
    if v % dp == 0:  # each rank reads exactly its share: nothing has to move
        assert all(sum(order.producer(m) == r for m in order.step_micro(3)) == 12 // dp
                   for r in range(dp))


def test_too_few_virtual_streams_for_the_readers_is_refused_with_the_numbers():
    check_cover(8, 4, 2)
    with pytest.raises(ValueError, match=r"virtual_streams=8 .* dp=4 x 4 loader worker\(s\) = "
                                         r"16 readers.*num_workers <= 2"):
        check_cover(8, 4, 4)
    with pytest.raises(ValueError, match="at most 8 data-parallel ranks"):
        check_cover(8, 16, 0)


def _heavy_tailed_costs(rng: random.Random, n: int) -> list[float]:
    """Like stage 2: text-only micro-batches (one dummy image), and image-heavy ones."""
    return [1.0 + (rng.choice((0, 0, 1, 3, 7, 14)) * 0.45) * rng.uniform(0.8, 1.2)
            for _ in range(n)]


def test_assign_balances_keeps_shares_and_is_deterministic():
    rng = random.Random(0)
    dp, share = 8, 16
    for _ in range(20):
        costs = _heavy_tailed_costs(rng, dp * share)
        producers = [m % dp for m in range(dp * share)]
        owner = assign(costs, producers, dp)
        assert [owner.count(r) for r in range(dp)] == [share] * dp
        assert straggler_ratio(costs, owner, dp) <= 1.01
        assert straggler_ratio(costs, producers, dp) > 1.05  # there was something to fix
        assert assign(costs, producers, dp) == owner
        assert sum(o != p for o, p in zip(owner, producers, strict=True)) < dp * share / 2


def test_assign_moves_nothing_when_already_balanced_and_fixes_unequal_reads():
    costs = [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]
    producers = [0, 0, 0, 0, 1, 1, 1, 1]
    assert assign(costs, producers, 2) == producers
    # Rank 0 read 6 of 8 (dp does not divide the virtual streams): two go to rank 1.
    producers = [0, 0, 0, 1, 0, 0, 0, 1]
    owner = assign(costs, producers, 2)
    assert owner.count(0) == owner.count(1) == 4
    loads = rank_loads(costs, owner, 2)
    assert max(loads) == min(loads) == 10.0
