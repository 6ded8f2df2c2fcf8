"""Checkpoints are verified before they are trusted: a damaged newest checkpoint or an
unusable `latest` is never read as "no checkpoint" (nothing restarts from step 1, nothing is
deleted); `checkpoint.on_damaged=fallback` resumes from the newest intact one with the
losses of an uninterrupted run, `stop` refuses in one message. A full disk during a save
removes the partial checkpoint and keeps `latest`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import TRAIN, callbacks, losses, metrics, overrides, plugin

from qwenvl_train.training.checkpoint_files import (
    DATA_STATE,
    MANIFEST,
    build_manifest,
    file_checksum,
    listing,
    read_latest,
    read_manifest,
    shares,
    verify_files,
)

ZERO2_ONE_RANK = ("parallel=zero2", "checkpoint.keep_last=3")  # a separate optimizer file
MODEL, OPTIMIZER = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _tree(run: Path) -> dict[str, int]:
    """Every checkpoint file with its size (what a rerun must not touch)."""
    root = run / "checkpoints"
    return {p.relative_to(root).as_posix(): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(demo_data, tmp_path_factory):
    """A finished 6-step single-process ZeRO-2 run with checkpoints at steps 2, 4, 6."""
    from conftest import REPO, _env

    run = tmp_path_factory.mktemp("finished") / "run"
    proc = subprocess.run([sys.executable, *TRAIN, *overrides(run, demo_data, *ZERO2_ONE_RANK)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0000002", "step_0000004", "step_0000006"]
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("run.lock"))
    return to


# -- the manifest, without a run -----------------------------------------------------------
def test_verification_names_truncated_missing_and_corrupted_files(tmp_path):
    step = tmp_path / "step_0000002"
    (step / "sub").mkdir(parents=True)
    for name, size in (("model.pt", 5000), ("optim.pt", 3000), ("sub/extra.bin", 10)):
        (step / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    sizes = listing(step)
    assert sizes == {"model.pt": 5000, "optim.pt": 3000, "sub/extra.bin": 10}
    manifest = build_manifest(step.name, 1, sizes, {n: file_checksum(step / n) for n in sizes})
    (step / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(step) == manifest and verify_files(step, manifest, list(sizes)) == []
    with open(step / "model.pt", "r+b") as f:
        f.truncate(100)
    (step / "optim.pt").write_bytes(b"y" * 3000)  # same size, other bytes
    (step / "sub" / "extra.bin").unlink()
    assert verify_files(step, manifest, list(sizes)) == [
        "model.pt is 100 bytes, the manifest says 5,000 (truncated)",
        "optim.pt: its checksum differs from the manifest's (corrupted)",
        "sub/extra.bin is missing"]
    (step / MANIFEST).write_text('{"files": ')
    assert "unreadable" in read_manifest(step)


def test_each_rank_verifies_a_share_balanced_by_bytes():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10}
    assert shares(sizes, 2) == [["a", "d"], ["b", "c"]]
    assert sorted(n for share in shares(sizes, 3) for n in share) == sorted(sizes)


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"), (b"garbage\n", "holds 'garbage', not a checkpoint tag"),
    (bytes(range(256)), "cannot be read as a tag"),
    (b"step_0000042", "names step_0000042, which does not exist")])
def test_an_unusable_latest_is_reported_not_taken_for_none(tmp_path, content, problem):
    (tmp_path / "latest").write_bytes(content)
    latest = read_latest(tmp_path)
    assert latest.tag is None and problem in latest.problem
    assert read_latest(tmp_path / "nowhere") == type(latest)()  # absent: no checkpoint


def _checkpoint(root: Path, tag: str, files: dict[str, bytes]) -> Path:
    step = root / tag
    step.mkdir(parents=True)
    for name, data in files.items():
        (step / name).write_bytes(data)
    sizes = listing(step)
    manifest = build_manifest(tag, 1, sizes, {n: file_checksum(step / n) for n in sizes})
    (step / MANIFEST).write_text(json.dumps(manifest))
    return step


def test_the_launch_check_reads_the_checkpoint_a_fallback_resume_picks(tmp_path):
    """`resume_candidate` (no process group) skips a newest checkpoint whose sizes or small
    files (data_state.json) are damaged, as `select_resume` does; a large file corrupted at
    its size is left to `select_resume`, whose pick run.py checks again."""
    from qwenvl_train.training.checkpoint import resume_candidate

    root = tmp_path / "checkpoints"
    files = {"model.pt": b"m" * (2 << 20), DATA_STATE: b'{"step": 4}'}
    _checkpoint(root, "step_0000004", files)
    step6 = _checkpoint(root, "step_0000006", {**files, DATA_STATE: b'{"step": 6}'})
    (root / "latest").write_text("step_0000006")
    assert resume_candidate(tmp_path, "fallback") == "step_0000006"
    (step6 / "model.pt").write_bytes(b"x" * (2 << 20))  # same size, other bytes
    assert resume_candidate(tmp_path, "fallback") == "step_0000006"
    (step6 / DATA_STATE).write_bytes(b'{"step": 7}')  # torn at its size
    assert resume_candidate(tmp_path, "fallback") == "step_0000004"
    assert resume_candidate(tmp_path, "stop") is None  # select_resume refuses
    (root / "latest").write_bytes(b"")
    assert resume_candidate(tmp_path, "fallback") == "step_0000004"
    assert resume_candidate(tmp_path, "stop") is None


# -- through the CLI -------------------------------------------------------------------------
@pytest.mark.slow
def test_an_unusable_latest_never_restarts_training(run_cli, finished, demo_data, tmp_path):
    """An empty `latest` (the other unusable contents: the unit test above) stops or, with
    on_damaged=fallback, resumes the newest intact checkpoint; nothing restarts."""
    run = _copy(finished, tmp_path / "run")
    (run / "checkpoints" / "latest").write_bytes(b"")
    before, rows = _tree(run), len(metrics(run))
    stop = run_cli(TRAIN[1], overrides(run, demo_data, *ZERO2_ONE_RANK,
                                       "checkpoint.on_damaged=stop"))
    assert stop.returncode == 1, stop.stderr[-3000:]
    assert f"cannot resume from {run / 'checkpoints'}" in stop.stderr
    assert f"echo step_0000006 > {run / 'checkpoints' / 'latest'}" in stop.stderr
    assert "Traceback" not in stop.stderr
    assert _tree(run) == before and len(metrics(run)) == rows  # nothing trained or deleted
    fallback = run_cli(TRAIN[1], overrides(run, demo_data, *ZERO2_ONE_RANK))
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "looking for the newest intact checkpoint" in fallback.stderr
    assert "resumed from step_0000006 at step 6" in fallback.stderr
    assert len(metrics(run)) == rows  # the finished run was not trained again


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# What is done to step 6 -> what the message says. All at once: each file is verified the
# same way, and the message names every problem.
DAMAGE = {
    MODEL: (_truncate, f"{MODEL} is "),
    OPTIMIZER: (_truncate, f"{OPTIMIZER} is "),
    "trainer_rank0.pt": (Path.unlink, "trainer_rank0.pt is missing"),
    # torn: the data-order launch check (training/elastic.py) must not read it either
    DATA_STATE: (_truncate, f"{DATA_STATE} is "),
}


@pytest.mark.slow
def test_a_damaged_checkpoint_stops_or_falls_back_with_exact_losses(run_cli, finished,
                                                                    demo_data, tmp_path):
    run = _copy(finished, tmp_path / "run")
    ref = losses(finished)
    for name, (do, _) in DAMAGE.items():
        do(run / "checkpoints" / "step_0000006" / name)
    before = _tree(run)
    stop = run_cli(TRAIN[1], overrides(run, demo_data, *ZERO2_ONE_RANK,
                                       "checkpoint.on_damaged=stop"))
    assert stop.returncode == 1, stop.stderr[-3000:]
    message = [line for line in stop.stderr.splitlines() if "qwenvl-train:" in line]
    assert len(message) == 1, stop.stderr[-3000:]
    assert all(says in message[0] for _, says in DAMAGE.values()), message[0]
    assert "step_0000006 is damaged" in message[0] and "on_damaged=fallback" in message[0]
    assert "Traceback" not in stop.stderr and _tree(run) == before
    fallback = run_cli(TRAIN[1], overrides(run, demo_data, *ZERO2_ONE_RANK))
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    warning = next(x for x in fallback.stderr.splitlines() if "step_0000006 is damaged" in x)
    assert all(says in warning for _, says in DAMAGE.values()), warning
    assert "resuming from step_0000004" in fallback.stderr
    assert losses(run) == ref  # steps 5 and 6 trained again: bitwise the same losses
    assert read_latest(run / "checkpoints").tag == "step_0000006"
    step6 = run / "checkpoints" / "step_0000006"
    manifest = read_manifest(step6)
    assert DATA_STATE in manifest["files"]
    assert verify_files(step6, manifest, list(manifest["files"])) == []
    assert (run / "checkpoints" / "step_0000004").is_dir()  # kept: keep_last=3


def _assert_save_of_step_4_failed_cleanly(proc, run: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("qwenvl-train:"))
    step4 = run / "checkpoints" / "step_0000004"
    assert f"checkpoint {step4} could not be written: no space left on device (ENOSPC)" in line
    assert "The partial checkpoint was removed and `latest` still names step_0000002" in line
    assert "Traceback" not in proc.stderr and not step4.exists()
    step2 = run / "checkpoints" / "step_0000002"
    assert read_latest(run / "checkpoints").tag == step2.name
    manifest = read_manifest(step2)
    assert verify_files(step2, manifest, list(manifest["files"])) == []
    assert not (run / "run.lock").exists()


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_latest_and_removes_the_partial_save(
        run_cli, finished, demo_data, tmp_path):
    run = tmp_path / "run"
    full = callbacks(plugin("faults.DiskFullInSave", step=4))
    proc = run_cli(TRAIN[1], overrides(run, demo_data, "parallel=single", full))
    _assert_save_of_step_4_failed_cleanly(proc, run)
    # grad_norm is logged with parallel=single (ZeRO-0 fp32) and equals what DeepSpeed
    # reports for the same steps under ZeRO-2.
    ours = {m["step"]: m["grad_norm"] for m in metrics(run)}
    ref = {m["step"]: m["grad_norm"] for m in metrics(finished)}
    assert sorted(ours) == [1, 2, 3, 4]
    assert all(math.isclose(ours[s], ref[s], rel_tol=1e-4) for s in ours), (ours, ref)


@pytest.mark.slow
def test_disk_full_on_a_small_real_file_system(run_cli, demo_data, tmp_path):
    """A 3 MiB tmpfs holds one stage-1 checkpoint of the tiny model (2.3 MB: the trained ViT
    and adapter with their AdamW state), not two."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = mnt / "run"
        proc = run_cli(TRAIN[1], overrides(run, demo_data, "parallel=single"))
        _assert_save_of_step_4_failed_cleanly(proc, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
