"""Shared fixtures: the small demo data set and a torchrun launcher that collects per-rank
results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What subprocesses import from: the checkout (also `tests.plugins.*`, the trainer callbacks
# the tests install) and, by name, the test helpers and the workers' shared modules.
IMPORT_PATH = [REPO, REPO / "tests", REPO / "tests" / "workers"]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    path = os.pathsep.join([*map(str, IMPORT_PATH), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true",
               PYTHONPATH=path)
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The reduced demo set (`build_demo(small=True)`), built once per test session."""
    from data_recipes.demo import build_demo

    out = tmp_path_factory.mktemp("demo_data")
    build_demo(out, small=True)
    return out


class RunResult:
    def __init__(self, proc: subprocess.CompletedProcess, results_dir: Path):
        self.proc = proc
        self.returncode = proc.returncode
        self.output = proc.stdout + proc.stderr
        self.ranks: dict[int, dict] = {}
        for path in sorted(results_dir.glob("rank*.json")):
            self.ranks[int(path.stem[4:])] = json.loads(path.read_text())


def launch_torchrun(args: list[str], nproc: int, *, results: Path, env: dict | None = None,
                    timeout: int = 300, check: bool = True) -> RunResult:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node=N ARGS...`."""
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env({"QWENVL_RESULTS_DIR": str(results),
                                                   **(env or {})}),
                          capture_output=True, text=True, timeout=timeout)
    result = RunResult(proc, results)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{result.output[-6000:]}")
    return result


@pytest.fixture
def torchrun(tmp_path):
    """Run `python -m torch.distributed.run --nproc_per_node=N ARGS...`.

    Worker scripts (tests/workers/) write their per-rank results to
    `$QWENVL_RESULTS_DIR/rank{r}.json`, training runs through the `results.RankResults`
    callback (tests/plugins/); they come back as `result.ranks`. A non-zero exit fails the
    test with the output unless `check=False`."""

    def launch(args: list[str], nproc: int, *, env: dict | None = None, timeout: int = 300,
               check: bool = True) -> RunResult:
        results = tmp_path / f"results_{len(list(tmp_path.glob('results_*')))}"
        return launch_torchrun(args, nproc, results=results, env=env, timeout=timeout,
                               check=check)

    return launch


@pytest.fixture
def run_cli():
    """Run a console entry point module (`python -m ...`) and return the completed process."""

    def run(module: str, args: list[str], *, env: dict | None = None, timeout: int = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO,
                              env=_env(env), capture_output=True, text=True, timeout=timeout)

    return run


# Runs a command's `main()` and reports, at exit, which heavy libraries it had imported.
_PROBE = """import atexit, sys
heavy = ("torch", "transformers", "deepspeed")
atexit.register(lambda: print("heavy:", [m for m in heavy if m in sys.modules]))
from {module} import main
sys.exit(main())
"""


@pytest.fixture
def probe_cli():
    """Run a console entry point (`module`'s `main`) with `args`; returns the completed
    process and the heavy libraries (torch, transformers, deepspeed) it imported."""

    def run(module: str, args: list[str], *, env: dict | None = None, timeout: int = 120
            ) -> tuple[subprocess.CompletedProcess, list[str]]:
        proc = subprocess.run([sys.executable, "-c", _PROBE.format(module=module), *args],
                              cwd=REPO, env=_env(env), capture_output=True, text=True,
                              timeout=timeout)
        heavy = [line for line in proc.stdout.splitlines() if line.startswith("heavy: ")]
        assert heavy, proc.stderr[-2000:]
        return proc, json.loads(heavy[-1][len("heavy: "):].replace("'", '"'))

    return run
