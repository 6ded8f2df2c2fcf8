"""`TrackingConfig`: the `tracking` Hydra group (W&B online/offline, or none). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl_train.checks import choice

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
    peak_tflops: float | None = None  # override the accelerator's peak for MFU
    init_timeout: float = 90.0  # seconds W&B may take to start before we go console-only

    def validate(self, prefix: str) -> None:
        choice(f"{prefix}.backend", self.backend, BACKENDS)
        choice(f"{prefix}.mode", self.mode, MODES)
