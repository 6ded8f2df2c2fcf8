"""A bf16 resume across layouts, checked end to end on the CPU (about 1 minute, 2 cores).

stage 1 on the tiny model in bf16 under pp2 (ZeRO-1 with fp32 gradient accumulation: there
DeepSpeed uses its BF16_Optimizer, not the ZeRO-1/2 optimizer the suite's fp32 tests use),
4 steps, checkpoint at step 2; then the step-2 checkpoint resumed under ZeRO-2 with dp=2.
Prints whether the resumed fp32 weights, Adam moments, step count and learning rates equal
the checkpoint's bit for bit (training/relayout.py), and the losses of steps 3-4 of both
runs. Uses the suite's helpers and the StartState plugin (tests/).

    OMP_NUM_THREADS=1 python scripts/check_relayout_bf16.py [--out runs/check_relayout]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from trainer_helpers import (  # noqa: E402
    TRAIN,
    assert_resumed_exactly,
    callbacks,
    losses,
    overrides,
    plugin,
)


def torchrun(args: list[str], nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "check_relayout")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = out / "demo_data"
    subprocess.run([sys.executable, "-m", "qwenvl_train.cli.data", "demo", "--out", str(data)],
                   cwd=REPO, check=True, capture_output=True)
    bf16 = "stage.precision=bf16"
    pp2, zero2, start = out / "pp2", out / "zero2", out / "start"
    torchrun([*TRAIN, *overrides(pp2, data, "parallel=pp2", bf16, steps=4)], 2)
    tag = "step_0000002"
    shutil.copytree(pp2 / "checkpoints" / tag, zero2 / "checkpoints" / tag)
    (zero2 / "checkpoints" / "latest").write_text(tag)
    shutil.copy(pp2 / "config.json", zero2 / "config.json")
    start.mkdir()
    record = callbacks(plugin("results.StartState", out=str(start)))
    torchrun([*TRAIN, *overrides(zero2, data, "parallel=zero2", bf16, record, steps=4)], 2)
    assert_resumed_exactly(start, pp2 / "checkpoints" / tag)
    print(f"bf16 pp2 {tag} resumed under ZeRO-2 dp2: weights, moments, step and lrs bitwise "
          "equal to the checkpoint")
    was, now = losses(pp2), losses(zero2)
    for step in (3, 4):
        print(f"step {step}: loss pp2 {was[step]:.9f}  resumed {now[step]:.9f}")


if __name__ == "__main__":
    main()
