"""Training throughput of the real trainer, per stage, on this machine.

    python scripts/bench_train.py [--model tiny] [--steps 12] [--nproc 1] [overrides ...]

Runs `qwenvl-train` for each stage on the demo data and reports the median over the steps
after the first two (start-up excluded) of tokens/s, samples/s, images/s, and per core
(CPU) or per device (GPU). Extra arguments are passed to every run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("perf/tokens_per_s", "perf/real_tokens_per_s", "perf/samples_per_s",
        "perf/images_per_s", "perf/tflops_per_device", "perf/mfu", "perf/step_time_s")


def run_stage(stage: str, args: argparse.Namespace, extra: list[str], out: Path) -> dict:
    run_dir = out / stage
    cmd = [sys.executable, "-m", "qwenvl_train.cli.train", f"stage={stage}",
           f"model={args.model}", "data=demo", "scale=demo", "tracking=none",
           f"run_dir={run_dir}", f"stage.steps={args.steps}", "export_at_end=false",
           f"checkpoint.every_steps={args.steps * 10}", *extra]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", *cmd[1:]]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=not args.verbose)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]
    result = {"wall_s": wall, "steps_measured": len(rows)}
    for key in KEYS:
        values = [r[key] for r in rows if key in r]
        if values:
            result[key] = statistics.median(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--stages", default="pretrain,multitask,sft")
    parser.add_argument("--verbose", action="store_true")
    args, extra = parser.parse_known_args()
    cores = len(os.sched_getaffinity(0))
    print(f"model={args.model} nproc={args.nproc} cores={cores} steps={args.steps} "
          f"(median over steps 3..{args.steps})")
    print(f"{'stage':10s} {'tok/s':>10s} {'tok/s/core':>11s} {'samples/s':>10s} "
          f"{'images/s':>9s} {'step s':>7s} {'wall s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            r = run_stage(stage, args, extra, Path(tmp))
            tok = r.get("perf/tokens_per_s", 0.0)
            print(f"{stage:10s} {tok:10.0f} {tok / cores:11.0f} "
                  f"{r.get('perf/samples_per_s', 0):10.2f} {r.get('perf/images_per_s', 0):9.2f} "
                  f"{r.get('perf/step_time_s', 0):7.2f} {r['wall_s']:7.1f}")


if __name__ == "__main__":
    main()
