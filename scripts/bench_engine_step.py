"""CPU cost of two engine-side switches on one rank: the data-parallel all-reduce DeepSpeed
runs after each backward at dp = 1 (skipped now, `Parallel.initialize`), and torch's fused
AdamW (`parallel.fused_adamw`) against the multi-tensor one.

    PYTHONPATH=. python scripts/bench_engine_step.py [--steps 6] [overrides ...]

Builds the trainer's engine (one process, ZeRO-0 unless overridden, `stage=multitask`: all
groups train) and times, in CPU-seconds per optimizer step over the steps after the first:
forward+backward with the all-reduce on and off, and `engine.step()` at the boundary with
each AdamW kernel. Both variants run in this process on the same batches.
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(cfg, fused: bool):
    """The trainer's set-up (training/run.py) with the AdamW kernel chosen."""
    from qwenvl_train.training.parallel.parallelize import parallelize
    from qwenvl_train.training.run import build_engine, build_qwenvl, freeze

    cfg.parallel.fused_adamw = fused
    model = build_qwenvl(cfg)
    freeze(cfg, model)
    return build_engine(cfg, parallelize(model, cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args, overrides = parser.parse_known_args()
    import torch
    from bench_common import demo_config

    from qwenvl_train.data.loader import build_loader
    from qwenvl_train.data.tokenizer import get_tokenizer
    from qwenvl_train.training.parallel.engine import init_distributed
    from qwenvl_train.training.trainer import _to_device

    cfg = demo_config(["stage=multitask", "stage.image_size=224"], overrides, "bench_engine_")
    init_distributed()
    loader = build_loader(cfg.data, get_tokenizer(), template=cfg.stage.template,
                          image_size=cfg.stage.image_size, seq_len=cfg.stage.seq_len,
                          pack=cfg.stage.pack, num_image_tokens=cfg.model.adapter.num_queries,
                          dp_rank=0, dp_size=1, micro_batch_size=cfg.stage.micro_batch_size,
                          seed=cfg.seed, num_workers=0)
    source = iter(loader)
    batches = [_to_device(next(source), torch.device("cpu"), torch.float32)
               for _ in range(args.steps)]
    source.close()
    accum = cfg.stage.global_batch_size // cfg.stage.micro_batch_size
    rows = {}
    for fused in (False, True):
        engine = build(cfg, fused)
        for allreduce in (True, False):
            engine.enable_backward_allreduce = allreduce
            fwd_bwd, opt_step = [], []
            for batch in batches:
                t0 = time.process_time()
                for _ in range(accum - 1):
                    engine.backward(engine(**batch).loss)
                    engine.step()
                engine.backward(engine(**batch).loss)
                t1 = time.process_time()
                engine.step()  # the boundary: clip + AdamW
                fwd_bwd.append(t1 - t0)
                opt_step.append(time.process_time() - t1)
            rows[(fused, allreduce)] = (statistics.median(fwd_bwd[1:]),
                                        statistics.median(opt_step[1:]))
        del engine
    print(f"{cfg.stage.name}, zero_stage {cfg.parallel.zero_stage}, {accum} micro-batches "
          f"per step; CPU-s per step (median of steps 2..{args.steps})")
    print(f"{'AdamW':12s} {'all-reduce':>10s} {'fwd+bwd':>9s} {'optimizer':>10s}")
    for (fused, allreduce), (fb, st) in rows.items():
        print(f"{'fused' if fused else 'multi-tensor':12s} {'on' if allreduce else 'off':>10s} "
              f"{fb:9.3f} {st:10.3f}")


if __name__ == "__main__":
    main()
