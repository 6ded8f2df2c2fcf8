"""Console progress: a tqdm bar on a terminal, plain lines with an ETA elsewhere.

Batch-job logs (SLURM, CI) are not terminals: a redrawn bar there is an unreadable stream
of carriage returns, so when the stream is not a TTY we print one self-contained line every
`log_every` steps instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from tqdm import tqdm

# (label, metric name) shown on the console; see `_find` for how names match.
CONSOLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"), ("lr", "lr"), ("tok/s", "tokens_per_s"), ("mfu", "mfu"),
)


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}d {h:02d}:{m:02d}:{s:02d}" if days else f"{h:d}:{m:02d}:{s:02d}"


def _find(metrics: Mapping[str, Any], name: str) -> Any:
    """`name`, else `*/name` (e.g. perf/mfu), else the first `name/*` (e.g. lr/llm)."""
    if name in metrics:
        return metrics[name]
    for match in (lambda k: k.endswith("/" + name), lambda k: k.startswith(name + "/")):
        for key, value in metrics.items():
            if match(key):
                return value
    return None


def _fmt(label: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{label} {value}"
    if label == "lr":
        return f"lr {value:.2e}"
    if label == "tok/s":
        return f"tok/s {value:,.0f}"
    if label == "mfu":
        return f"mfu {100 * value:.1f}%"
    return f"{label} {value:.4f}"


class Progress:
    """Step progress with ETA. `update(step, metrics)` after each optimizer step (or every
    few steps); the ETA uses the mean step time since this process's first update, so time
    spent before a resume or on start-up does not distort it."""

    def __init__(
        self,
        total: int | None,
        *,
        start_step: int = 0,
        log_every: int = 1,
        stream: IO[str] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.total, self.log_every = total, max(1, int(log_every))
        self.stream = stream or sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self._t0: float | None = None
        self._step0 = start_step
        self._bar = (
            tqdm(total=total, initial=start_step, file=self.stream, dynamic_ncols=True,
                 unit="step", smoothing=0.05)
            if self.tty else None
        )
        self._last = start_step

    def eta(self, step: int) -> float | None:
        if self.total is None or self._t0 is None or step <= self._step0:
            return None
        per_step = (time.monotonic() - self._t0) / (step - self._step0)
        return per_step * max(self.total - step, 0)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self._t0 is None:  # clock starts at the first report: excludes start-up time
            self._t0, self._step0 = time.monotonic(), step
        metrics = metrics or {}
        fields = [(label, _find(metrics, name)) for label, name in CONSOLE_FIELDS]
        shown = " | ".join(_fmt(label, v) for label, v in fields if v is not None)
        if self._bar is not None:
            self._bar.update(step - self._last)
            if shown:
                self._bar.set_postfix_str(shown, refresh=False)
            self._bar.refresh()
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(self.line(step, shown) + "\n")
            self.stream.flush()
        self._last = step

    def line(self, step: int, shown: str = "") -> str:
        total = "?" if self.total is None else str(self.total)
        pct = f" ({100 * step / self.total:.1f}%)" if self.total else ""
        parts = [f"step {step}/{total}{pct}"] + ([shown] if shown else [])
        parts.append(f"ETA {format_duration(self.eta(step))}")
        return " | ".join(parts)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
