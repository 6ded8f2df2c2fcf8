"""`qwenvl-train`: the Hydra app that runs one stage.

    qwenvl-train stage=pretrain model=tiny data=demo
    torchrun --nproc_per_node=8 -m qwenvl_train.cli.train stage=multitask model=qwenvl_7b

The composed config is validated (schema, allowed values, batch arithmetic, parallel
layout, data on disk) before any process group starts; up to there nothing imports torch.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from qwenvl_train.config import CONFIG_DIR, ConfigError, to_schema, validate_launch
from qwenvl_train.training.callbacks import load_callbacks


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _app(raw: DictConfig) -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True,
    )
    try:
        cfg = to_schema(raw)
        validate_launch(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        callbacks = load_callbacks(cfg.callbacks)
    except ConfigError as e:
        print(f"qwenvl-train: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    from qwenvl_train.training.run import run

    run(cfg, callbacks)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _app()


if __name__ == "__main__":
    main()
