"""Rank 0 trains on a batch with an image, rank 1 on a text-only batch, under ZeRO-3.

Without the always-run vision path, rank 1 would skip the ViT's parameter gathers and both
ranks would wait forever. Writes per-rank results to $QWENVL_RESULTS_DIR/rank{r}.json."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from qwenvl_train.config import load_config
from qwenvl_train.data.tokenizer import get_tokenizer
from qwenvl_train.training.parallel.engine import init_distributed
from qwenvl_train.training.parallel.parallelize import parallelize
from qwenvl_train.training.run import build_engine, build_qwenvl, dummy_batch, freeze
from qwenvl_train.training.trainer import Trainer, TrainState


class ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches

    def stats(self):
        return {}

    def state_dict(self):
        return {}


class NullMeter:
    def update(self, counts, step_time):
        return {}

    def state_dict(self):
        return {}


class NullTracker:
    def log(self, step, metrics):
        pass


def make_batch(with_image: bool, num_queries: int, image_size: int) -> dict:
    tok = get_tokenizer()
    ids = tok.encode("a text-only line about shapes") + [tok.eod_id]
    if with_image:
        ids = [tok.img_start_id] + [tok.img_pad_id] * num_queries + [tok.img_end_id] + ids
    n = len(ids)
    labels = [-100] * (n - 8) + ids[-8:]
    images = torch.randn(1 if with_image else 0, 3, image_size, image_size)
    return {
        "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
        "position_ids": torch.arange(n)[None], "segment_ids": torch.ones(1, n, dtype=torch.long),
        "images": images, "task_ids": torch.zeros(1, n, dtype=torch.long),
        "keys": ["k"], "sources": ["test"], "num_samples": 1, "num_images": images.shape[0],
        "num_real_tokens": n,
    }


def main() -> None:
    run_dir = sys.argv[1]
    cfg = load_config(["model=tiny", "parallel=zero3", "stage=sft", "scale=demo",
                       "stage.global_batch_size=2", "stage.micro_batch_size=1",
                       "stage.image_size=56", f"run_dir={run_dir}", "stage.steps=2",
                       "stage.optim.warmup_steps=1"])
    info = init_distributed()
    model = build_qwenvl(cfg)
    freeze(cfg, model)
    par = parallelize(model, cfg)
    engine = build_engine(cfg, par)
    batch = make_batch(info.rank == 0, cfg.model.adapter.num_queries, cfg.stage.image_size)
    loader = ListLoader([batch])
    it = iter(loader)
    trainer = Trainer(cfg, info, engine, par, loader, it, NullTracker(), NullMeter(),
                      1, dummy_batch(cfg), TrainState())
    trainer.metrics_path = os.devnull
    step_losses = [trainer._optimizer_step(it).loss for _ in range(2)]
    out = {"steps": len(step_losses), "losses": step_losses, "num_images": batch["num_images"]}
    with open(os.path.join(os.environ["QWENVL_RESULTS_DIR"], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
