"""Tracker (W&B offline, failures, ranks), console progress and the throughput meter."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from qwenvl_train.training.observe import progress as progress_mod
from qwenvl_train.training.observe import tracking
from qwenvl_train.training.observe.config import TrackingConfig
from qwenvl_train.training.observe.tracking import RUN_ID_FILE, ThroughputMeter, Tracker

OFFLINE = TrackingConfig(backend="wandb", mode="offline", project="qwenvl-test", tags=["test"])


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_offline_run_and_resume_same_id(tmp_path: Path) -> None:
    out = io.StringIO()
    tracker = Tracker.create(OFFLINE, tmp_path, {"stage": {"name": "pretrain"}}, rank=0,
                             total_steps=4, stream=out)
    for step in (1, 2):
        tracker.log(step, {"loss": 2.0 / step, "lr/llm": 1e-4})
    tracker.summary({"params/total": 123})
    tracker.close()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("run-*.wandb"))

    # rerunning the same run_dir continues the same W&B run id
    again = Tracker.create(OFFLINE, tmp_path, {}, rank=0, total_steps=4, start_step=2,
                           stream=io.StringIO())
    assert again.run is not None and again.run.id == run_id
    assert again.run.starting_step == 0  # offline, W&B does not resume: a new segment
    again.log(3, {"loss": 0.5})
    assert again.run.step == 3  # ... whose steps continue at the training step
    again.close()
    assert all(p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*"))


def test_resumed_online_run_skips_the_steps_wandb_already_has(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after logging step 6, resumed from the checkpoint of step 4: W&B's run goes
    on at its step 7; steps 5 and 6 (the same values again, exact resume) are not sent."""
    import wandb

    class ResumedRun:
        id, starting_step = "abc", 7

        def __init__(self) -> None:
            self.logged: list[tuple[int, dict]] = []

        def define_metric(self, *args, **kwargs) -> None:
            pass

        def log(self, data: dict, step: int) -> None:
            self.logged.append((step, data))

        def finish(self, exit_code: int = 0) -> None:
            pass

    run = ResumedRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    online = TrackingConfig(backend="wandb", mode="online", project="p")
    tracker = Tracker.create(online, tmp_path, {}, rank=0, total_steps=9, start_step=4,
                             stream=io.StringIO())
    for step in (5, 6, 7, 8):
        tracker.log(step, {"loss": 1.0})
    tracker.close()
    assert [(s, d["train/step"]) for s, d in run.logged] == [(7, 7), (8, 8)]


def test_wandb_init_failure_falls_back_to_console(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("network is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    out = io.StringIO()
    with pytest.warns(RuntimeWarning, match="network is down"):
        tracker = Tracker.create(OFFLINE, tmp_path, {}, rank=0, total_steps=2, stream=out)
    assert tracker.run is None
    tracker.log(1, {"loss": 1.25})
    tracker.log(2, {"loss": 1.0})
    tracker.summary({"x": 1})
    tracker.close()
    text = out.getvalue()
    assert "continuing with console logging only" in text
    assert "step 2/2" in text and "loss 1.0000" in text


def test_wandb_log_failure_warns_once(tmp_path: Path) -> None:
    class BrokenRun:
        finished = False

        def log(self, *a, **k):
            raise ConnectionError("gone")

        def finish(self, exit_code=None):
            self.finished = True

    out = io.StringIO()
    tracker = Tracker(progress_mod.Progress(3, stream=out), run=BrokenRun())
    run = tracker.run
    with pytest.warns(RuntimeWarning, match="gone"):
        tracker.log(1, {"loss": 3.0})
    tracker.log(2, {"loss": 2.0})  # no second warning, no exception
    tracker.close()
    assert run.finished and tracker.run is None
    assert out.getvalue().count("console logging only") == 1
    assert "step 2/3" in out.getvalue()


def test_other_ranks_do_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tracker = Tracker.create(OFFLINE, tmp_path / "run", {}, rank=1, total_steps=3)
    tracker.log(1, {"loss": 1.0})
    tracker.summary({"a": 1})
    tracker.write("hello")
    tracker.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_disabled_backend_writes_nothing(tmp_path: Path) -> None:
    cfg = TrackingConfig(backend="none", mode="disabled", project="p")
    tracker = Tracker.create(cfg, tmp_path, {}, rank=0, total_steps=1, stream=io.StringIO())
    tracker.log(1, {"loss": 1.0})
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="allowed"):  # checked once, by the config
        TrackingConfig(backend="tensorboard", mode="offline").validate("tracking")


def test_non_tty_progress_lines_have_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    out = io.StringIO()
    bar = progress_mod.Progress(100, start_step=10, log_every=5, stream=out)
    assert not bar.tty
    for step in range(11, 21):
        bar.update(step, {"loss": 1.5, "lr/vit": 2e-4, "perf/tokens_per_s": 12345.6,
                          "perf/mfu": 0.42})
        clock.now += 2.0  # 2 s per step
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # steps 15 and 20 only
    # 9 steps in 18 s since the first report at step 11; 80 steps left -> 160 s
    assert lines[1] == ("step 20/100 (20.0%) | loss 1.5000 | lr 2.00e-04 | tok/s 12,346 | "
                        "mfu 42.0% | ETA 0:02:40")
    assert progress_mod.format_duration(2 * 86400 + 3661) == "2d 01:01:01"


def test_throughput_meter_rates_and_mfu() -> None:
    # 2 data-parallel replicas x tp 2 = 4 devices; each replica does 1e12 FLOPs per 0.5 s step
    meter = ThroughputMeter(dp_size=2, world_size=4, peak_flops=2e12,
                            flops_fn=lambda c: 1e12, window=2)
    counts = {"samples": 4, "images": 4, "tokens": 1000, "real_tokens": 800}
    m = meter.update(counts, 0.5)
    assert m["perf/tokens_per_s"] == 4000  # 2 x 1000 / 0.5
    assert m["perf/samples_per_s"] == 16 and m["perf/images_per_s"] == 16
    assert m["perf/real_tokens_per_s"] == 3200
    assert m["perf/tokens_per_s_per_device"] == 1000
    assert m["perf/padding_frac"] == pytest.approx(0.2)
    assert m["perf/tflops_per_device"] == pytest.approx(1.0)  # 2e12 / 0.5 s / 4
    assert m["perf/mfu"] == pytest.approx(0.5)
    assert any(k.startswith("mem/") for k in m)
    m = meter.update(counts, 1.5)  # window of 2 steps: 4000 tokens in 2 s
    assert m["perf/tokens_per_s"] == 2000
    assert meter.state_dict()["tokens"] == 4000
    meter.update(counts, 1.0)
    meter.update(counts, 1.0)
    assert meter.update(counts, 1.0)["perf/tokens_per_s"] == 2000  # old steps left the window


def test_meter_from_train_config_on_cpu() -> None:
    model = NS(vision=NS(patch_size=14, width=8, layers=1, heads=2, mlp_dim=16),
               adapter=NS(num_queries=4, embed_dim=8, heads=2, post_group="vit"),
               llm=NS(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=16, vocab_size=10), lora=NS(parts=[]))
    cfg = NS(model=model, parallel=NS(pp=1, tp=1), tracking=NS(peak_tflops=None),
             stage=NS(image_size=28, seq_len=8, trainable=["vit", "adapter"], precision="bf16"))
    counts = {"samples": 1, "images": 1, "tokens": 8, "real_tokens": 8}
    m = ThroughputMeter.create(cfg, dp_size=1, device="cpu").update(counts, 1.0)
    assert "perf/mfu" not in m and m["perf/tflops_per_device"] > 0  # no peak on a CPU
    cfg.tracking.peak_tflops = 1e-6  # user override -> MFU reported
    m = ThroughputMeter.create(cfg, dp_size=1, device="cpu").update(counts, 1.0)
    assert m["perf/mfu"] == pytest.approx(m["perf/tflops_per_device"] / 1e-6)
    assert tracking.memory_stats()["mem/max_rss_gib"] > 0


def test_metrics_past_the_restored_step_and_cut_lines_are_dropped(tmp_path: Path) -> None:
    from qwenvl_train.training.trainer import keep_metrics_up_to

    path = tmp_path / "metrics.jsonl"
    lines = [f'{{"step": {s}, "loss": {1.0 / s}}}' for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed while writing step 5
    keep_metrics_up_to(path, 4)
    assert path.read_text() == "\n".join(lines) + "\n"
    keep_metrics_up_to(path, 2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    keep_metrics_up_to(tmp_path / "none.jsonl", 3)  # a fresh run: nothing to do
