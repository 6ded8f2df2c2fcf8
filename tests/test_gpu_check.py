"""scripts/gpu_check.sh stops clearly where it cannot run. (Its --cpu-smoke run takes
minutes on this machine: `OMP_NUM_THREADS=1 scripts/gpu_check.sh --cpu-smoke`.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_names_the_cpu_smoke():
    out = _run()
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and "--cpu-smoke" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_override_stops_before_anything_is_built():
    out = _run("--cpu-smoke", "model.llm.num_layerz=3")
    assert out.returncode == 2 and "num_layerz" in out.stderr
    assert "Traceback" not in out.stderr and "(c)" not in out.stdout
