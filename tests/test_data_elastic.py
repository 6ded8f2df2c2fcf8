"""Resume across layouts with real processes: the loader and the exchange over gloo.

dp=4 x 2 workers saves after step 3; dp=2 x 0 workers resumes it (4 -> 2 ranks, workers
2 -> 0), runs 10 steps and saves after step 6; dp=4 x 1 worker resumes that (2 -> 4) for
10 steps. Every global batch (the micro-batches of all ranks: keys, token ids, images)
must be the one an uninterrupted single-process run makes, while balancing moves
micro-batches between ranks."""

from __future__ import annotations

import hashlib

import pytest
from elastic_loader import STAGE, TASKS, cost

from qwenvl_train.data.config import DataConfig, SourceConfig
from qwenvl_train.data.loader import build_loader
from qwenvl_train.data.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow
WORKER = "tests/workers/elastic_loader.py"


def _reference(root, steps: int) -> list[list]:
    """The global batches of one uninterrupted dp=1 run (the order ignores the layout)."""
    data = DataConfig(root=str(root), virtual_streams=8,
                      sources={t: SourceConfig(f"{t}-*.tar") for t in TASKS})
    loader = build_loader(data, get_tokenizer(), **STAGE, dp_rank=0, dp_size=1,
                          num_workers=0, cost=cost)
    it, per_step = iter(loader), loader.spec.micro_per_step
    out = []
    for _ in range(steps):
        out.append([[b["micro_batch"], b["keys"], hashlib.sha1(b["input_ids"].numpy()).hexdigest(),
                     float(b["images"].sum())] for b in (next(it) for _ in range(per_step))])
    return out


def _global_batches(result, per_rank: int) -> dict[int, list]:
    """step -> every rank's micro-batches, in global order; each rank got its share."""
    steps: dict[int, list] = {}
    for r in result.ranks.values():
        for s in r["steps"]:
            assert len(s["micro"]) == per_rank
            steps.setdefault(s["step"], []).extend(s["micro"])
    return {k: sorted(v) for k, v in steps.items()}


def test_global_batches_survive_4_to_2_to_4_ranks_and_worker_changes(torchrun, demo_data,
                                                                      tmp_path):
    ref = _reference(demo_data, 16)
    s3, s6 = tmp_path / "s3.json", tmp_path / "s6.json"
    runs = [  # (ranks, workers, steps, extra)
        (4, 2, 6, ["--save-at", "3", str(s3)]),
        (2, 0, 10, ["--resume", str(s3), "--save-at", "6", str(s6)]),
        (4, 1, 10, ["--resume", str(s6)]),
    ]
    moved = 0
    for ranks, workers, steps, extra in runs:
        result = torchrun([WORKER, str(demo_data), str(workers), str(steps), *extra],
                          nproc=ranks, timeout=240)
        got = _global_batches(result, 8 // ranks)
        assert len(got) == steps
        for step, micro in got.items():
            assert micro == ref[step], (ranks, workers, step)
        moved += sum(r["moved"] for r in result.ranks.values())
        for s in result.ranks[0]["steps"]:
            if s["balance"]:
                assert s["balance"]["after"] <= s["balance"]["before"]
    assert moved > 0  # balancing did move micro-batches between ranks
