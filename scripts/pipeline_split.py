"""Print the compute-balanced pipeline split of a model for the recipe's resolutions.

    python scripts/pipeline_split.py                       # qwenvl_7b, pp 4 and 8
    python scripts/pipeline_split.py --model tiny --pp 2 --images-per-row 1

The first layer is ViT + adapter + token embedding (always on stage 0), then one layer per
decoder block, then norm + LM head + loss. Costs are training FLOPs per LLM row
(qwenvl_train/training/observe/flops.py): 3x forward for trained parts, 2x for frozen parts that
pass gradients back, 1x for frozen parts in front of everything trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from qwenvl_train.model.config import QwenVLConfig
from qwenvl_train.training.parallel.partition import images_per_row, plan_split

CONFIGS = Path(__file__).resolve().parents[1] / "qwenvl_train" / "configs"
# (label, image size, LLM row length, packed rows, trainable groups): docs/recipe.md stages 1, 2.
SETTINGS = (
    ("stage 1 (pretrain): 224px / 512 tokens, LLM frozen", 224, 512, False, ("vit", "adapter")),
    ("stage 2 (multitask): 448px / 2048 tokens packed, all trained", 448, 2048, True,
     ("vit", "adapter", "llm")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwenvl_7b", help="configs/model/<name>.yaml")
    parser.add_argument("--pp", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--images-per-row", type=float, default=None,
                        help="images per LLM row (default: 1 unpacked, as many as fit packed)")
    args = parser.parse_args(argv)
    cfg = QwenVLConfig.from_dict(OmegaConf.load(CONFIGS / "model" / f"{args.model}.yaml"))
    for label, size, seq_len, pack, trainable in SETTINGS:
        images = args.images_per_row
        if images is None:
            images = images_per_row(seq_len, cfg.adapter.num_queries, pack)
        for pp in args.pp:
            split = plan_split(cfg, pp, size, seq_len, trainable, images=images)
            print(f"== {args.model}, pp={pp}, {label}; {images:.2f} images per row")
            print(split.describe())
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
