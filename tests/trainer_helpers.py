"""Helpers for the trainer tests: the CLI overrides of a tiny run and readers of its output."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TRAIN = ["-m", "qwenvl_train.cli.train"]


def overrides(run_dir: Path, demo_data: Path, *extra: str, steps: int = 6,
              stage: str = "pretrain") -> list[str]:
    return [
        f"stage={stage}", "model=tiny", "data=demo", "scale=demo", "tracking=none",
        f"data.root={demo_data}", f"run_dir={run_dir}", f"stage.steps={steps}",
        "checkpoint.every_steps=2", "stage.optim.warmup_steps=2",
        # The export the tests read back; the other formats have their own tests (and
        # test_source_config / the stage-1 reference write all three through a run).
        "export.formats=[consolidated]", *extra,
    ]


def plugin(name: str, **kwargs) -> str:
    """One entry of `callbacks`: a trainer callback of tests/plugins with its arguments,
    e.g. plugin("faults.KillAfterStep", step=5)."""
    args = "".join(f",{key}:{value!r}" for key, value in kwargs.items())
    return f"{{_target_:tests.plugins.{name}{args}}}"


def callbacks(*plugins: str) -> str:
    """The override that installs `plugins` into the run's trainer."""
    return f"callbacks=[{','.join(plugins)}]"


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after resume) keeps the last."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def export_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "export" / "model.safetensors"))


def initial_state(stage_image_size: int = 224, seed: int = 1234) -> dict[str, torch.Tensor]:
    """The tiny model exactly as the trainer initialises it (same seed, same build)."""
    from qwenvl_train.config import load_config
    from qwenvl_train.model.qwenvl import build_model
    from qwenvl_train.training.run import seed_everything

    cfg = load_config(["model=tiny"])
    seed_everything(seed)
    model = build_model(cfg.model, image_size=stage_image_size)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def split_by_group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    from qwenvl_train.model.groups import GROUPS, group_of

    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for name, tensor in state.items():
        out[group_of(name)][name] = tensor
    return out


def equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (bitwise)."""
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return [k for k in a if not torch.equal(a[k], b[k])]


def update_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """What an optimizer update changes, from the checkpoint of `step` (all ranks' files):
    parameters (bit16 and ZeRO's fp32 partitions) and optimizer state (Adam's exp_avg,
    exp_avg_sq and step count), by path. Schedules and counters are left out."""
    out: dict[str, torch.Tensor] = {}

    def collect(prefix: str, node) -> None:
        if isinstance(node, torch.Tensor):
            out[prefix] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                collect(f"{prefix}.{key}", value)
        elif isinstance(node, list | tuple):
            for i, value in enumerate(node):
                collect(f"{prefix}.{i}", value)

    tag = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    for path in sorted(tag.glob("*_states.pt")):  # DeepSpeed's model and optimizer files
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        for key in ("module", "optimizer", "optimizer_state_dict"):
            collect(f"{path.stem}.{key}", ckpt.get(key))
    return out


def assert_step_skipped(run, step: int) -> None:
    """Parameters, Adam's moments and its step count after `step` equal those before it."""
    before, skipped = update_state(run, step - 1), update_state(run, step)
    assert equal_tensors(before, skipped) == []
    for kind in ("exp_avg", "exp_avg_sq", "step"):
        assert any(k.endswith(f".{kind}") for k in skipped), kind


def start_state(out: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """What plugins/results.StartState wrote: every trainable parameter's full fp32 weight
    and Adam moments (tensor slices joined) by plain-model name, and the counters."""
    files = [torch.load(p, weights_only=False) for p in sorted(Path(out).glob("state_*.pt"))]
    files.sort(key=lambda f: f["tp_rank"])
    params: dict[str, dict[str, torch.Tensor]] = {}
    for name in {n for f in files for n in f["params"]}:
        slices = [f["params"][name] for f in files if name in f["params"]]
        dim = slices[0]["dim"]
        params[name] = {key: (torch.cat([s[key] for s in slices], dim=dim) if dim is not None
                              else slices[0][key]) for key in ("fp32", "exp_avg", "exp_avg_sq")}
    meta = {key: files[0][key] for key in ("steps", "lrs", "global_steps")}
    assert all({k: f[k] for k in meta} == meta for f in files), "ranks disagree"
    return params, meta


def assert_resumed_exactly(out: Path, step_dir: Path) -> None:
    """The state a resume under another layout started from (StartState's `out`) equals
    the checkpoint `step_dir` bitwise: weights, both moments, step count, learning rates."""
    from qwenvl_train.training.relayout import SavedState

    params, meta = start_state(out)
    saved = SavedState.open(step_dir)
    assert set(params) == saved.names()
    for name, got in params.items():
        want = saved.full(name, got["fp32"].shape)
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
    assert meta["steps"] == [float(saved.step())] * len(meta["steps"])
    assert meta["lrs"] == {k: v["lr"] for k, v in saved.group_settings().items()}
    assert meta["global_steps"] == int(step_dir.name.split("_")[-1])


def resume_copy(src: Path, dst: Path, step: int) -> Path:
    """A run dir holding `src`'s checkpoint of `step`, its config and its metrics up to
    that step (a rerun in `src` after the later checkpoints were lost)."""
    tag = f"step_{step:07d}"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    (dst / "metrics.jsonl").write_text(
        "".join((src / "metrics.jsonl").read_text().splitlines(True)[:step]))
    return src / "checkpoints" / tag


def start_state_plugin(out: Path) -> str:
    """The `callbacks` override that makes a run write its resumed state to `out`
    (plugins/results.StartState; read with `start_state`, `assert_resumed_exactly`)."""
    out.mkdir()
    return callbacks(plugin("results.StartState", out=str(out)))


# Losses of a resume under another layout vs the uninterrupted run. The resumed state is
# bitwise the saved one (asserted); afterwards only the order of fp32 reductions differs
# (data-parallel sums, tensor-parallel partial products): ~1e-7 relative per reordering,
# kept at that order by Adam's normalised update over 2 steps. Measured: <= 8e-8.
RELAYOUT_RTOL = 1e-5


def close_losses(want: dict, got: dict, steps: tuple[int, ...]) -> None:
    assert all(abs(got[s] - want[s]) <= RELAYOUT_RTOL * abs(want[s]) for s in steps), (want, got)



def launch(args: list[str], nproc: int, *, timeout: int = 300,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `scripts/launch_torchrun.sh ARGS` with `nproc` processes (the user's launcher)."""
    from conftest import REPO, _env

    return subprocess.run([str(REPO / "scripts" / "launch_torchrun.sh"), *args], cwd=REPO,
                          env=_env({"NPROC_PER_NODE": str(nproc), **(env or {})}),
                          capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes (not zombies) whose command line contains `text`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            out.append(int(proc.name))
    return out


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)
