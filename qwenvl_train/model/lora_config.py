"""`model.lora`: low-rank adapters on the registry's linears (the layers are in `lora.py`).

What trains with LoRA on (the rule; `groups.set_trainable` applies it):
  - `stage.trainable` names the groups that learn, as without LoRA;
  - a trainable group listed in `model.lora.targets` learns ONLY through its LoRA matrices:
    every base tensor of the group (linears, norms, embeddings, LM head) stays frozen;
  - a trainable group not listed trains fully (e.g. the adapter in stage 3 with LoRA on
    the LLM);
  - a target that the stage freezes is a config error (it would silently do nothing).

Torch-free: config validation imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from qwenvl_train.model.groups import GROUPS, LORA_DEFAULT_PARTS


@dataclass
class LoRAConfig:
    # Defaults: the released Qwen-VL fine-tuning script's LoRA (r 64, alpha 16, dropout 0.05).
    enabled: bool = False
    rank: int = 64
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.05  # on the adapter's input only; the base path never drops
    targets: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_PARTS))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def parts(self) -> list[str]:
        """The groups adapted by LoRA in this run: the targets when enabled, else none."""
        return list(self.targets) if self.enabled else []

    def validate(self, prefix: str = "model.lora") -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"{prefix}.enabled: must be true or false, got {self.enabled!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"{prefix}.rank: must be an integer > 0, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"{prefix}.alpha: must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}.dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError(f"{prefix}.targets: name at least one of {list(GROUPS)}")
        unknown = [t for t in self.targets if t not in GROUPS]
        if unknown:
            raise ValueError(f"{prefix}.targets: unknown part(s) {unknown}; allowed: "
                             f"{list(GROUPS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{prefix}.targets: {list(self.targets)} names a part twice")

    def validate_for_run(self, trainable: Iterable[str], tp: int,
                         prefix: str = "model.lora") -> None:
        """The rules that involve the stage and the layout (only when enabled)."""
        if not self.enabled:
            return
        trainable = list(trainable)
        frozen = [t for t in self.targets if t not in trainable]
        if frozen:
            raise ValueError(
                f"{prefix}.targets: {frozen} frozen in this stage (stage.trainable="
                f"{trainable}); LoRA adapts only groups the stage trains: drop them from "
                f"{prefix}.targets or add them to stage.trainable")
        if tp > 1 and self.dropout > 0:
            # Tensor ranks hold the same LoRA A (column) / B (row) and must drop the same
            # inputs; their RNG streams are not kept in step.
            raise ValueError(
                f"{prefix}.dropout: must be 0 with tensor parallelism (parallel.tp={tp}), "
                f"got {self.dropout}")

