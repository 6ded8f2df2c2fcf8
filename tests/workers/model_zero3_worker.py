"""Worker for test_weights.py::test_zero3_init_import_and_train (run under torchrun, 2 ranks).

Builds the tiny model inside `deepspeed.zero.Init`, imports a released-layout checkpoint
into the partitioned parameters, and checks the forward against the independent reference;
then a text-only training step (the vision path must run on every rank)."""

from __future__ import annotations

import importlib
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

# Skip compiling DeepSpeed's shm op on first init (DEEPSPEED-CPU.md).
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from model_helpers import (  # noqa: E402
    ref_qwen_v1_logits,
    ref_released_visual,
    released_ckpt,
    sample_ids,
    tiny_config,
)

from qwenvl_train.model.qwenvl import build_model  # noqa: E402
from qwenvl_train.model.weights import load_qwenvl  # noqa: E402


def main(ckpt: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = tiny_config()
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = build_model(cfg, 224)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    gen = torch.Generator().manual_seed(4)
    sd = released_ckpt(cfg, gen)  # same seed on every rank: same tensors as the file
    load_qwenvl(model, ckpt)
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=list(model.parameters()))
    engine.eval()
    ids = sample_ids(48, 1, cfg.adapter.num_queries, gen)[None]
    images = torch.randn(1, 3, 224, 224, generator=gen)
    with torch.no_grad():
        logits = engine(ids, images).logits
        embeds = sd["transformer.wte.weight"][ids].clone()
        embeds[ids == 151859] = ref_released_visual(sd, images, cfg).reshape(-1, 64)
        diff = (logits - ref_qwen_v1_logits(sd, cfg, embeds)).abs().max().item()
    engine.train()
    text = torch.randint(0, 5000, (1, 32), generator=gen)
    loss = engine(text, torch.zeros(0, 3, 224, 224), labels=text).loss
    engine.backward(loss)
    engine.step()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"partitioned": partitioned, "diff": diff, "loss": loss.item()}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
