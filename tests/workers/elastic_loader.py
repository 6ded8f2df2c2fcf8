"""The training loader alone on every rank, with the real exchange over gloo (no model).

    torchrun --nproc_per_node=N tests/workers/elastic_loader.py DEMO_DATA WORKERS STEPS \
        [--save-at K STATE_OUT] [--resume STATE_IN]

Each rank pulls its micro-batches of STEPS global steps (stage 2, packed, balanced) and
writes, to $QWENVL_RESULTS_DIR/rank{r}.json, per step: the
global micro-batch index, keys and a digest of the token ids of each micro-batch it got,
and the step's estimated balance. `--save-at K` writes the global data state after step K
(rank 0, as a checkpoint does); `--resume` starts from such a state."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

from qwenvl_train.data.config import DataConfig, SourceConfig
from qwenvl_train.data.loader import build_loader
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.training.elastic import ReaderExchange

TASKS = ("caption", "vqa", "grounding", "ref_grounding", "grounded_caption", "ocr", "text")
# Stage 2 of the tiny model, smaller images: 8 micro-batches of 2 packed rows per step.
STAGE = {"template": "multitask", "image_size": 28, "seq_len": 256, "pack": True,
         "num_image_tokens": 64, "micro_batch_size": 2, "global_batch_size": 16, "seed": 1}


def cost(batch: dict) -> float:
    """A stand-in for the trainer's FLOP estimate (the trainer-level test uses that one;
    here any deterministic cost will do): images dominate, tokens and spans add."""
    return 1.0 + 4.0 * max(1, batch["num_images"]) + batch["seg_sq_tokens"] / 4096


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("workers", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--save-at", nargs=2)
    ap.add_argument("--resume")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = DataConfig(root=args.root, virtual_streams=8,
                      sources={t: SourceConfig(f"{t}-*.tar") for t in TASKS})
    group = dist.new_group(list(range(world)), backend="gloo")
    exchange = ReaderExchange(group, list(range(world)), rank,
                              {"world_size": world, "pp": 1, "tp": 1, "dp": world,
                               "zero_stage": 0})
    loader = build_loader(data, get_tokenizer(), **STAGE, dp_rank=rank, dp_size=world,
                          num_workers=args.workers, exchange=exchange, cost=cost)
    start = 0
    if args.resume:
        state = json.loads(Path(args.resume).read_text())
        loader.load_state_dict(state)
        start = state["step"]
    per_rank = loader.spec.micro_per_step // world
    it = iter(loader)
    steps = []
    for step in range(start, start + args.steps):
        got = [next(it) for _ in range(per_rank)]
        steps.append({"step": step, "balance": loader.last_balance, "micro": [
            [b["micro_batch"], b["keys"], hashlib.sha1(b["input_ids"].numpy()).hexdigest(),
             float(b["images"].sum())] for b in got]})
        if args.save_at and step + 1 == int(args.save_at[0]):
            state = loader.state_dict()  # collective: every virtual stream's position
            if rank == 0:
                Path(args.save_at[1]).write_text(json.dumps(state))
    result = {"rank": rank, "steps": steps, "moved": exchange.moved,
              "moved_bytes": exchange.moved_bytes}
    Path(os.environ["QWENVL_RESULTS_DIR"], f"rank{rank}.json").write_text(json.dumps(result))
    it.close()  # stops the DataLoader workers
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
