"""Ctrl-C on a single-process run, as a terminal sends it (SIGINT to the whole process group:
trainer, data workers, W&B's service), then resuming: metrics.jsonl and W&B continue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import TRAIN, losses, metrics, overrides

from qwenvl_train.training.checkpoint import latest_tag

pytestmark = pytest.mark.slow


def _ctrl_c_after(args: list[str], run: Path, step: int) -> tuple[int, str]:
    """Start the CLI in its own process group; Ctrl-C once metrics.jsonl reaches `step`."""
    from conftest import REPO, _env

    proc = subprocess.Popen([sys.executable, *TRAIN, *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_ctrl_c_saves_exits_130_and_the_rerun_continues_metrics_and_wandb(demo_data, tmp_path):
    run = tmp_path / "run"
    args = overrides(run, demo_data, "tracking=wandb_offline", "tracking.peak_tflops=0.5",
                     "data.num_workers=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
                     steps=100)
    code, out = _ctrl_c_after(args, run, step=3)
    step = max(losses(run))
    assert code == 130, out[-3000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in out
    assert (f"SIGINT: checkpoint saved at step {step}; to resume, rerun the same command "
            f"(run_dir={run})") in out
    assert "Traceback" not in out and "console logging only" not in out, out[-3000:]
    assert latest_tag(run) == f"step_{step:07d}" and 3 <= step < 100
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    assert all(r["perf/mfu"] > 0 for r in rows)  # a CPU run reports MFU once a peak is set
    first = losses(run)

    # As if killed after step `step` was logged but before its checkpoint: `latest` names
    # the one before. The rerun drops the metric line of `step` and trains it again.
    (run / "checkpoints" / "latest").write_text(f"step_{step - 1:07d}")
    code, out = _ctrl_c_after(args, run, step=step + 1)
    assert code == 130, out[-3000:]
    assert f"resumed from step_{step - 1:07d} at step {step - 1}" in out
    again = metrics(run)
    assert [r["step"] for r in again] == list(range(1, max(losses(run)) + 1))  # no repeats
    assert losses(run)[step] == first[step]  # exact resume: the same loss again
    assert again[:step - 1] == rows[:step - 1]  # the lines before the checkpoint are kept
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)
    assert "Traceback" not in out
    # rank 0's log of both launches is in run_dir/train.log; Hydra writes no folder of its own
    log = (run / "train.log").read_text()
    assert log.count("group vit     params") == 2 and "SIGINT: checkpoint saved" in log
    assert f"resumed from step_{step - 1:07d}" in log and not (run / "hydra").exists()
