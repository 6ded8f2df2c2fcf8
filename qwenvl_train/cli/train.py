"""`qwenvl-train`: the Hydra app that runs one stage.

    qwenvl-train stage=pretrain model=tiny data=demo
    torchrun --nproc_per_node=8 -m qwenvl_train.cli.train stage=multitask model=qwenvl_7b

The composed config is validated (schema, allowed values, batch arithmetic, parallel
layout) before any process group starts.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from qwenvl_train.config import CONFIG_DIR, ConfigError, TrainConfig, to_schema


def validate_launch(cfg: TrainConfig) -> None:
    """Checks that need the world size, still before distributed init."""
    from qwenvl_train.training.parallel.engine import (
        check_device_support,
        grad_accumulation_steps,
    )
    from qwenvl_train.training.parallel.topology import validate_parallel

    sizes = validate_parallel(cfg.parallel, int(os.environ.get("WORLD_SIZE", 1)))
    grad_accumulation_steps(cfg, sizes.dp)
    check_device_support(cfg)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _app(raw: DictConfig) -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True,
    )
    try:
        cfg = to_schema(raw)
        validate_launch(cfg)
    except ConfigError as e:
        print(f"qwenvl-train: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    from qwenvl_train.training.run import run

    run(cfg, OmegaConf.to_container(raw, resolve=True))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _app()


if __name__ == "__main__":
    main()
