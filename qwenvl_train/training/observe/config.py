"""`TrackingConfig`: the `tracking` Hydra group (W&B online/offline, or none). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl_train.checks import choice, positive

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


@dataclass
class TrackingConfig:
    backend: str = "wandb"
    mode: str = "offline"
    project: str = "qwenvl-train"
    entity: str | None = None
    name: str | None = None  # W&B run name; default: the run_dir's name
    tags: list[str] = field(default_factory=list)
    # Peak TFLOP/s of one device for MFU (perf/mfu): set it on a CPU or a GPU that
    # observe/flops.py does not list; it overrides the table.
    peak_tflops: float | None = None
    init_timeout: float = 90.0  # seconds W&B may take to start before we go console-only

    def validate(self, prefix: str) -> None:
        choice(f"{prefix}.backend", self.backend, BACKENDS)
        choice(f"{prefix}.mode", self.mode, MODES)
        if self.peak_tflops is not None:
            positive(f"{prefix}.peak_tflops", self.peak_tflops)
