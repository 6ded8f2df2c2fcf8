"""Start-up cost of the commands: help, a rejected override and Hydra's own errors, in CPU
seconds (user + system of the child process: steadier than wall time on a shared machine).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/bench_startup.py [--rounds 3]

Runs each command `--rounds` times as `python -m <module> ...` from the repository root and
prints the minimum and the median CPU seconds, the wall seconds of the fastest round and the
exit status. The target is < 2 CPU s for every row (tests/test_cli_startup.py and
tests/test_config.py check that none of them imports torch, transformers or deepspeed).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [
    ("qwenvl-data --help", "qwenvl_train.cli.data", ["--help"]),
    ("qwenvl-data inspect --help", "qwenvl_train.cli.data", ["inspect", "--help"]),
    ("qwenvl-eval --help", "qwenvl_train.cli.eval", ["--help"]),
    ("qwenvl-train --help", "qwenvl_train.cli.train", ["--help"]),
    ("qwenvl-train parallel.zero_stage=7", "qwenvl_train.cli.train", ["parallel.zero_stage=7"]),
    ("qwenvl-train stage=bogus", "qwenvl_train.cli.train", ["stage=bogus"]),
    ("qwenvl-train stage.lr=abc", "qwenvl_train.cli.train", ["stage.lr=abc"]),
    ("qwenvl-train data=shards data.shards=[/nowhere/*.tar]", "qwenvl_train.cli.train",
     ["data=shards", "data.shards=[/nowhere/*.tar]"]),
]


def cpu_seconds(module: str, args: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, exit status) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    print(f"{'command':56s} {'cpu min':>8s} {'cpu med':>8s} {'wall':>7s} {'exit':>4s}")
    for label, module, args in COMMANDS:
        runs = [cpu_seconds(module, args) for _ in range(rounds)]
        best = min(runs)
        print(f"{label:56s} {best[0]:8.2f} {statistics.median(r[0] for r in runs):8.2f} "
              f"{best[1]:7.2f} {best[2]:4d}")


if __name__ == "__main__":
    main()
