"""Straggler ratio of stage 2 at dp = 8, before and after compute-balanced assignment.

Simulated from the loader alone (no model): one loader reads every virtual stream of the
stage-2 mixture (the offline demo set with the paper's task weights, `data=demo`) in the
global order, which is the same under any layout; for each step the estimated cost of
every micro-batch is the trainer's (training/elastic.py:micro_batch_cost: the FLOP
formulas of observe/flops.py for `model=qwenvl_7b` at 448 px, 2048-token rows, all parts
trained; a micro-batch without images counts the dummy image the vision path runs on).

  before: every rank trains the micro-batches it read (the previous behaviour: each rank
          packs and trains its own rows);
  after:  data/balance.py's assignment (each rank still gets M / dp micro-batches).

straggler ratio = mean over steps of (max rank cost / mean rank cost); a synchronous step
lasts as long as its most loaded rank, so the implied step-time saving is
1 - mean(max after) / mean(max before) (the mean rank cost is the same).

Images are decoded at --decode-size (default 28 px) to keep the run short: which samples
go into which row does not depend on the pixel size (an image is 256 tokens at any size),
and costs are computed at the stage's 448 px. `--decode-size 448` gives the same numbers.
Exchange cost per step at 448 px: the all-reduce of 16 bytes per micro-batch plus the
micro-batches that change owner (uint8 images + five int64 [mb, 2048] tensors).

    OMP_NUM_THREADS=1 python scripts/bench_balance.py [--steps 20] [--global-batch 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl_train.config import load_config  # noqa: E402
from qwenvl_train.data.balance import assign, rank_loads  # noqa: E402
from qwenvl_train.data.global_order import GlobalOrder  # noqa: E402
from qwenvl_train.data.loader import build_loader  # noqa: E402
from qwenvl_train.data.tokenizer import get_tokenizer  # noqa: E402
from qwenvl_train.training.elastic import micro_batch_cost  # noqa: E402


def payload_bytes(batch: dict, image_size: int) -> int:
    """What moving this micro-batch costs at the stage's image size (uint8 images)."""
    return batch["num_images"] * 3 * image_size ** 2 + 5 * 8 * batch["input_ids"].numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="demo data dir (built there if missing; default: a temp dir)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    ap.add_argument("--decode-size", type=int, default=28)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if not any(root.glob("*.tar")):
            from data_recipes.demo import build_demo

            build_demo(root)
        print("| global batch (rows) | micro-batches / rank | virtual streams | straggler "
              "before | after | implied step-time saving | moved / step | exchange MB / "
              "rank / step |\n|---|---|---|---|---|---|---|---|")
        for rows in args.global_batch:
            print(run(root, rows, args), flush=True)


def run(root: Path, rows: int, args) -> str:
    v = args.dp * args.workers
    cfg = load_config(["stage=multitask", "model=qwenvl_7b", "data=demo", f"data.root={root}",
                       f"data.virtual_streams={v}", f"stage.global_batch_size={rows}"])
    stage = cfg.stage
    loader = build_loader(
        cfg.data, get_tokenizer(), template=stage.template, image_size=args.decode_size,
        seq_len=stage.seq_len, pack=stage.pack, num_image_tokens=cfg.model.adapter.num_queries,
        dp_rank=0, dp_size=1, micro_batch_size=stage.micro_batch_size, seed=cfg.seed,
        num_workers=0, global_batch_size=rows)
    cost = micro_batch_cost(cfg)
    m = loader.spec.micro_per_step
    order = GlobalOrder(v, m, args.dp, args.workers)
    it = iter(loader)
    before, after, max_b, max_a, moved, moved_bytes = [], [], [], [], [], []
    for step in range(args.steps):
        batches = [next(it) for _ in range(m)]
        costs = [cost(b) for b in batches]
        producers = [order.producer(i) for i in order.step_micro(step)]
        owners = assign(costs, producers, args.dp)
        lb, la = rank_loads(costs, producers, args.dp), rank_loads(costs, owners, args.dp)
        mean = sum(lb) / args.dp
        before.append(max(lb) / mean)
        after.append(max(la) / mean)
        max_b.append(max(lb))
        max_a.append(max(la))
        moves = [i for i, (p, o) in enumerate(zip(producers, owners, strict=True)) if p != o]
        moved.append(len(moves))
        sent = [0] * args.dp
        for i in moves:
            sent[producers[i]] += payload_bytes(batches[i], stage.image_size)
        moved_bytes.append(max(sent) + 2 * 16 * m)  # busiest sender + cost all-reduce
    saving = 1 - statistics.fmean(max_a) / statistics.fmean(max_b)
    return (f"| {rows} | {m // args.dp} | {v} | {statistics.fmean(before):.3f} "
            f"(max {max(before):.3f}) | {statistics.fmean(after):.3f} (max {max(after):.3f}) "
            f"| {saving:.1%} | {statistics.fmean(moved):.1f} of {m} | "
            f"{statistics.fmean(moved_bytes) / 2**20:.1f} |")


if __name__ == "__main__":
    main()
