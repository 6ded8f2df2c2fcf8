"""Every fatal error ends the run on every rank, promptly, with one message and a non-zero
exit: data errors (1 and 2 ranks, loader workers or not), a rank that fails while its peer
is outside any collective, a rank blocked in a collective whose peer is hung. Multi-rank
runs go through scripts/launch_torchrun.sh, which reports a failed worker in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from trainer_helpers import (
    TRAIN,
    callbacks,
    launch,
    overrides,
    plugin,
    processes_mentioning,
    wait_for,
)


def test_a_failure_is_one_message_and_a_bug_keeps_its_traceback(tmp_path):
    from qwenvl_train.cli.failures import report_failure
    from qwenvl_train.data.stream import DataError

    def report(error: Exception) -> str:
        try:
            raise error
        except Exception as e:
            code, text = report_failure(e, str(tmp_path), 0)
        assert code == 1
        return text

    text = report(DataError("33 bad samples in a row"))
    assert text.splitlines() == ["qwenvl-train: rank 0: 33 bad samples in a row",
                                 f"  run dir {tmp_path}: no checkpoint was written; a rerun "
                                 "starts from step 1"]
    full = report(OSError(28, "No space left on device", str(tmp_path / "export")))
    assert full.startswith("qwenvl-train: rank 0: the disk is full") and "Traceback" not in full
    bug = report(KeyError("boom")).splitlines()
    assert bug[0] == "qwenvl-train: rank 0: training failed: KeyError: 'boom'"
    assert bug[2].startswith("Traceback") and bug[-1] == bug[0]


# name -> (stage, overrides, what the message says). Each fails at the first batch. Two
# virtual streams (the fewest two ranks can read) with 21 caption samples each: 8 bad ones
# in a row come before a stream's epoch ends (which is "no usable sample").
IN_A_ROW = ["data.virtual_streams=2", "data.max_consecutive_bad=7"]
DATA_ERRORS = {
    "seq_len_too_short": ("multitask", ["stage.seq_len=72", "data.num_workers=1", *IN_A_ROW],
                          "stage.seq_len=72 is too short for these samples"),
    # Without the manifests every source is read, and sft takes only the chat samples.
    "no_usable_sample": ("sft", ["data.use_manifests=false", "data.num_workers=0"],
                         "found no usable sample"),
    "bad_samples": ("pretrain", ["data.max_image_pixels=100", "data.num_workers=1", *IN_A_ROW],
                    "8 bad samples in a row"),
}


def _assert_one_message_and_nothing_left(proc, run, says: str, nproc: int) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    # One message per rank (a rank still setting up when torchrun stops the group ends on
    # SIGTERM's default action, silently).
    assert 1 <= out.count(says) <= nproc, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    assert processes_mentioning(str(run)) == []  # no rank, no DataLoader worker


@pytest.mark.slow
@pytest.mark.parametrize("error", sorted(DATA_ERRORS))
def test_a_data_error_ends_a_single_process_run(run_cli, demo_data, tmp_path, error):
    stage, extra, says = DATA_ERRORS[error]
    run = tmp_path / "run"
    proc = run_cli(TRAIN[1], overrides(run, demo_data, *extra, steps=3, stage=stage),
                   timeout=300)  # before the fix: never exits
    _assert_one_message_and_nothing_left(proc, run, says, nproc=1)
    assert "a rerun starts from step 1" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("error", sorted(DATA_ERRORS))
def test_a_data_error_ends_every_rank_through_the_launcher(demo_data, tmp_path, error):
    stage, extra, says = DATA_ERRORS[error]
    run = tmp_path / "run"
    proc = launch(overrides(run, demo_data, *extra, steps=3, stage=stage), nproc=2)
    _assert_one_message_and_nothing_left(proc, run, says, nproc=2)
    assert "launch: rank" in proc.stderr and "exited with code 1" in proc.stderr


@pytest.mark.slow
def test_a_failing_rank_stops_a_peer_that_waits_outside_any_collective(demo_data, tmp_path):
    """Rank 1 hits a bug while rank 0 is busy elsewhere (no socket tells rank 0): rank 1's
    failure note ends rank 0 within seconds, not torchrun's 30 s SIGKILL later."""
    run = tmp_path / "run"
    hooks = callbacks(plugin("faults.FailOnRank", step=1, rank=1, kind="bug"),
                      plugin("faults.SleepOnRank", step=1, rank=0))
    t0 = time.time()
    proc = launch(overrides(run, demo_data, hooks, steps=3), nproc=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    # The failing rank: one clear line first (what, where, how to resume), then the trace.
    first = out.index("qwenvl-train: rank 1: training failed: RuntimeError: injected bug")
    assert out.index("Traceback", first) > first
    assert f"run dir {run}: no checkpoint was written" in out
    assert "qwenvl-train: rank 0 stops: rank 1: RuntimeError: injected bug on rank 1" in out
    assert "forcefully exiting" not in out and processes_mentioning(str(run)) == []
    assert time.time() - t0 < 240


@pytest.mark.slow
def test_a_rank_blocked_in_a_collective_exits_after_sigterm(demo_data, tmp_path):
    """Rank 1 hangs (SIGSTOP); rank 0 blocks in its next collective, where Python never runs
    the SIGTERM handler (as with NCCL and a dead peer). SIGTERM still ends rank 0 after
    stop_grace_s, with a message."""
    from conftest import REPO, _env

    run, pid_file = tmp_path / "run", tmp_path / "rank1.pid"
    freeze = callbacks(plugin("faults.FreezeRank", step=1, rank=1, pid_file=str(pid_file)))
    args = overrides(run, demo_data, "stop_grace_s=3", freeze, steps=50)
    proc = subprocess.Popen([str(REPO / "scripts" / "launch_torchrun.sh"), *args], cwd=REPO,
                            env=_env({"NPROC_PER_NODE": "2"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(pid_file.exists, 240, "rank 1 to stop itself")
        rank0 = json.loads((run / "run.lock").read_text())["pid"]
        time.sleep(2)  # rank 0 is now inside the all-reduce of step 1's stop check
        os.kill(rank0, signal.SIGTERM)
        wait_for(lambda: rank0 not in processes_mentioning(str(run)), 60,
                 "rank 0 to exit after SIGTERM")
        os.kill(int(pid_file.read_text()), signal.SIGCONT)  # let rank 1 see its peer gone
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "qwenvl-train: rank 0 got SIGTERM" in out, out[-3000:]
    assert "has not reached the next step boundary (stop_grace_s=3)" in out
    assert proc.returncode != 0 and not (run / "run.lock").exists()
