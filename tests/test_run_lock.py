"""One run per run directory: a second launch is refused naming the holder; a lock left by a
dead process on this host is taken over; one from another host is refused with how to
remove it. Killing the launcher's process group (SIGKILL) leaves no worker running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from trainer_helpers import TRAIN, metrics, overrides, processes_mentioning, wait_for

from qwenvl_train.training.run_lock import LOCK_FILE, RunLock, RunLockError, lock_holder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = RunLock.acquire(tmp_path / "run")
    with pytest.raises(RunLockError) as err:
        RunLock.acquire(tmp_path / "run")
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in str(err.value)
    assert lock_holder(tmp_path / "run")["stale"] is False
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunLock.acquire(tmp_path / "run").release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "started": "yesterday"}))
    assert lock_holder(tmp_path)["stale"] is True
    lock = RunLock.acquire(tmp_path)
    assert "which is not running; taking it over" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": "node-17", "pid": 4242, "started": "2026-01-01 10:00:00 UTC"}))
    with pytest.raises(RunLockError) as err:
        RunLock.acquire(tmp_path)
    assert "pid 4242 on host node-17, started 2026-01-01 10:00:00 UTC" in str(err.value)
    assert f"Check on node-17; if no run is there, remove {tmp_path / LOCK_FILE}" in str(
        err.value)


@pytest.mark.slow
def test_second_launch_is_refused_and_killing_the_launcher_group_stops_the_workers(
        run_cli, demo_data, tmp_path):
    from conftest import REPO, _env

    run = tmp_path / "run"
    args = overrides(run, demo_data, steps=400)
    launcher = subprocess.Popen([str(REPO / "scripts" / "launch_torchrun.sh"), *args],
                                cwd=REPO, env=_env({"NPROC_PER_NODE": "2"}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2, 300,
                 "the first run to train")
        holder = lock_holder(run)
        second = run_cli(TRAIN[1], args, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert (f"qwenvl-train: cannot start: run_dir: {run} is in use by pid "
                f"{holder['pid']} on host {socket.gethostname()}") in second.stderr
        assert "Traceback" not in second.stderr
        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun and this script, not the workers
        launcher.wait()
        # Before: both ranks trained on to step 400, writing the run dir.
        wait_for(lambda: processes_mentioning(str(run)) == [], 180, "the workers to exit")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(run)):
            os.kill(pid, signal.SIGKILL)
    holder = lock_holder(run)
    assert holder is None or holder["stale"], holder
    assert max(m["step"] for m in metrics(run)) < 400
