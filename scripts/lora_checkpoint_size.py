"""Trainable parameters and checkpoint size of a stage with and without LoRA.

    python scripts/lora_checkpoint_size.py                          # qwenvl_7b, stage 3, r 64
    python scripts/lora_checkpoint_size.py --model tiny --rank 8 --targets llm adapter

Counts come from the real model built on the meta device (no memory), LoRA applied from the
registry's targets and frozen by the same rule as the trainer. Checkpoints hold only trainable
tensors; per trainable parameter they take 12 bytes of optimizer state (fp32 master + AdamW's
two moments; all ZeRO-3 stores) plus, under ZeRO-0/1/2, the module's own copy (2 bytes in
bf16, 4 in fp32).
"""

from __future__ import annotations

import argparse

import torch

from qwenvl_train.config import load_config
from qwenvl_train.model import groups
from qwenvl_train.model.lora import apply_lora
from qwenvl_train.model.qwenvl import build_model

OPTIMIZER_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq


def trainable_by_group(cfg, lora: bool) -> dict[str, int]:
    with torch.device("meta"):
        model = build_model(cfg.model, image_size=cfg.stage.image_size)
        if lora:
            apply_lora(model, cfg.model.lora, seed=0)
    groups.set_trainable(model, cfg.stage.trainable, cfg.model.adapter.post_group,
                         lora_parts=cfg.model.lora.parts if lora else ())
    return {g: c.trainable for g, c in groups.count_by_group(model,
                                                              cfg.model.adapter.post_group).items()}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwenvl_7b")
    parser.add_argument("--stage", default="sft")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", nargs="+", default=["llm"])
    args = parser.parse_args(argv)
    cfg = load_config([f"model={args.model}", f"stage={args.stage}", "model.lora.enabled=true",
                       f"model.lora.rank={args.rank}",
                       f"model.lora.targets=[{','.join(args.targets)}]"])
    print(f"{args.model}, stage={args.stage} (trainable {cfg.stage.trainable}), LoRA rank "
          f"{args.rank} on {args.targets}")
    for label, lora in (("full", False), ("LoRA", True)):
        counts = trainable_by_group(cfg, lora)
        total = sum(counts.values())
        by_group = ", ".join(f"{g} {n:,}" for g, n in counts.items())
        print(f"  {label:4s}: trainable {total:>14,}  ({by_group})")
        print(f"        checkpoint ~ {_size(total * OPTIMIZER_BYTES)} (ZeRO-3), "
              f"{_size(total * (OPTIMIZER_BYTES + 2))} (ZeRO-1/2 bf16), "
              f"{_size(total * (OPTIMIZER_BYTES + 4))} (ZeRO-1/2 fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
