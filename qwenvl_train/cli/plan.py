"""`qwenvl-plan`: memory per GPU, the largest micro-batch that fits, step FLOPs and step
time, per stage and parallel layout, for the same Hydra overrides as a run.

    qwenvl-plan model=qwenvl_7b --gpu H100 --world 8 --mfu 0.4 \\
        --stages pretrain,multitask,sft --layouts zero2,zero3,tp2

`--stages` / `--layouts` name configs of the `stage` / `parallel` groups (default: the
ones the overrides select). The model is built on the meta device only: nothing is
allocated and no GPU is needed. The memory model is training/observe/memory.py.
"""

from __future__ import annotations

import argparse
import sys

from qwenvl_train.checks import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qwenvl-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="H100", help="H100 | H200 | A100")
    ap.add_argument("--world", type=int, default=8, help="number of GPUs")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for "
                    "the step time (ViT FLOPs counted)")
    ap.add_argument("--stages", default=None, help="comma list of stage configs")
    ap.add_argument("--layouts", default=None, help="comma list of parallel configs")
    args, overrides = ap.parse_known_args(argv)
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unknown option(s) {[o for o in overrides if o.startswith('-')]}")
    try:
        return _run(args, overrides)
    except ConfigError as e:
        print(f"qwenvl-plan: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from qwenvl_train.config import load_config
    from qwenvl_train.training.observe.plan import format_table, gpu, plan_row

    device = gpu(args.gpu)
    if args.world < 1:
        raise ConfigError(f"--world: must be >= 1, got {args.world}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
    base = load_config(overrides)
    stages = args.stages.split(",") if args.stages else [base.stage.name]
    picked = [o.split("=", 1)[1] for o in overrides if o.startswith("parallel=")]
    layouts = args.layouts.split(",") if args.layouts else (picked or ["single"])
    rest = [o for o in overrides if not o.startswith(("stage=", "parallel="))]
    rows = []
    for stage in stages:
        for layout in layouts:
            cfg = load_config([f"stage={stage}", f"parallel={layout}", *rest])
            rows.append(plan_row(cfg, layout, args.world, device, args.mfu))
    print(format_table(rows, device, args.world, args.mfu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
