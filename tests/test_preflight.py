"""Launch errors are one message naming the key and the fix, exit code 2, found before
anything is written: no run_dir, no `hydra/` dir, the run's config.json untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import TRAIN, overrides

from qwenvl_train.checks import LaunchError
from qwenvl_train.config import load_config
from qwenvl_train.training.preflight import check_run_dir


def _refused(run_cli, args: list[str], says: str, *, env: dict | None = None):
    proc = run_cli(TRAIN[1], args, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("qwenvl-train:")]
    assert len(lines) == 1 and says in lines[0], proc.stderr[-3000:]
    assert lines[0].startswith("qwenvl-train: cannot start: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_a_run_dir_that_is_a_file_or_under_one(run_cli, demo_data, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    _refused(run_cli, overrides(file, demo_data), f"run_dir: {file} is a file")
    _refused(run_cli, overrides(file / "run", demo_data),
             f"run_dir: {file / 'run'} cannot be created: {file} is a file")
    assert file.read_text() == "x"
    # ".." after a missing directory: judged where the OS would land (the file), not on the
    # lexical path (it passed, then creating the run dir failed with a traceback).
    sneaky = tmp_path / "missing" / ".." / "file"
    with pytest.raises(LaunchError, match="is a file"):
        check_run_dir(load_config(overrides(sneaky, demo_data)))
    assert not (tmp_path / "missing").exists()


def _finished_run(run: Path, *args: str) -> str:
    """A run dir as a finished run leaves it (config.json, a checkpoint, latest)."""
    config = json.dumps(load_config(list(args)).to_dict(), indent=2)
    (run / "checkpoints" / "step_0000006").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_0000006")
    (run / "config.json").write_text(config)
    return config


@pytest.mark.parametrize("change, says, fix", [
    (["stage.seq_len=1024"], "stage.seq_len=512 (this launch: 1024)", "stage.seq_len=512"),
    (["model=qwenvl_7b"], "model.llm.hidden_size=64 (this launch: 4096)", "model=tiny"),
])
def test_a_rerun_with_another_model_or_sequence_length(run_cli, demo_data, tmp_path, change,
                                                       says, fix):
    run = tmp_path / "run"
    base = overrides(run, demo_data)
    config = _finished_run(run, *base[:5])
    line = _refused(run_cli, [*base, *change], says)
    assert f"{run} holds checkpoints (step_0000006) trained with" in line
    assert f"rerun with {fix}" in line and f"init_from={run}" in line
    assert (run / "config.json").read_text() == config  # not overwritten
    assert not (run / "hydra").exists() and not (run / "run.lock").exists()


def test_resume_never_would_overwrite_checkpoints(run_cli, demo_data, tmp_path):
    run = tmp_path / "run"
    _finished_run(run, "model=tiny", "scale=demo")
    _refused(run_cli, overrides(run, demo_data, "resume=never"),
             "resume=never: " + f"{run} holds checkpoints (step_0000006)")


def test_a_model_that_does_not_fit_is_refused_with_needed_and_available_memory(
        run_cli, demo_data, tmp_path):
    run = tmp_path / "run"
    line = _refused(run_cli, overrides(run, demo_data, "model=qwenvl_7b"),
                    "model=qwenvl_7b: one process needs at least ")
    needed = float(line.split("needs at least ")[1].split(" GiB")[0].replace(",", ""))
    available = float(line.split("this cpu has ")[1].split(" GiB")[0].replace(",", ""))
    # 9.6B parameters in fp32 on the CPU, ViT + adapter trained (stage 1): >= 4 bytes each.
    assert 36 < needed and available < needed
    assert not run.exists()
