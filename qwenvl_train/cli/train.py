"""`qwenvl-train`: run one stage.

    qwenvl-train stage=pretrain model=tiny data=demo
    torchrun --nproc_per_node=8 -m qwenvl_train.cli.train stage=multitask model=qwenvl_7b

The overrides are composed onto the Hydra config (`configs/train.yaml`) and validated
(schema, allowed values, batch arithmetic, parallel layout, data on disk) before any process
group starts; up to there nothing imports torch. A rejected config -- also an option or key
that does not exist -- is one line naming the key and what is allowed, exit status 2. So is
a launch that cannot go ahead (training/preflight.py: run_dir, a rerun's compatibility with
its checkpoints, memory; then rank 0 takes the run directory's lock, training/run_lock.py),
found before anything is written.

A failure during the run is one message per rank (cli/failures.py), exit status 1, and
ends the process at once on every rank (training/failfast.py).

Plain overrides are composed with Hydra's compose API, not run as a Hydra app: its runner
would report a bad override with its own text and exit status 1, and make a timestamped
output folder per process holding a log file that stays empty (we log to the console and
to run_dir/train.log). `--help` is ours; Hydra's other flags (`--cfg job`, `--info`, `-m`,
`--hydra-help`) still go to its app.

Ctrl-C stops at the next step boundary with a checkpoint (a second Ctrl-C aborts at once);
both exit with status 130 and say how to resume.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qwenvl_train.checks import LaunchError
from qwenvl_train.config import (
    CONFIG_DIR,
    ConfigError,
    TrainConfig,
    compose,
    to_schema,
    validate_launch,
)
from qwenvl_train.training import failfast
from qwenvl_train.training.callbacks import TrainerCallback, load_callbacks
from qwenvl_train.training.preflight import check_launch
from qwenvl_train.training.run_lock import RunLock

INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a process stopped by Ctrl-C
LOG_FORMAT = "[%(asctime)s rank{rank}] %(message)s"


class RunLogFile(logging.Handler):
    """Appends log records to run_dir/train.log once the run directory exists; records
    from before (nothing is written before the launch checks pass) wait in memory."""

    def __init__(self, path: Path, keep: int = 1000) -> None:
        super().__init__()
        self.path, self.keep = path, keep
        self._waiting: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._waiting.append(self.format(record))
            if self.path.parent.is_dir():
                with open(self.path, "a") as f:
                    f.write("".join(line + "\n" for line in self._waiting))
                self._waiting.clear()
            else:
                del self._waiting[:-self.keep]
        except Exception:
            self.handleError(record)


def _console_logging() -> int:
    """Rank 0 logs INFO to the console, the other ranks warnings only; returns the rank."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=LOG_FORMAT.format(rank=rank), datefmt="%H:%M:%S", force=True)
    return rank


def _setup_logging(run_dir: str) -> None:
    rank = _console_logging()
    if rank == 0:
        handler = RunLogFile(Path(run_dir) / "train.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank),
                                               datefmt="%Y-%m-%d %H:%M:%S"))
        logging.getLogger().addHandler(handler)


def _checked(raw: DictConfig | None, overrides: list[str]
             ) -> tuple[TrainConfig, list[TrainerCallback], RunLock | None]:
    """The validated config, its callbacks and (rank 0) the run lock, or exit 2 with the
    one-line reason."""
    _console_logging()  # what the checks report (e.g. sizes read from the weights)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = to_schema(raw if raw is not None else compose(overrides))
        validate_launch(cfg, world_size)
        callbacks = load_callbacks(cfg.callbacks)
        check_launch(cfg, world_size)
        lock = RunLock.acquire(cfg.run_dir) if int(os.environ.get("RANK", 0)) == 0 else None
        return cfg, callbacks, lock
    except ConfigError as e:
        what = "cannot start" if isinstance(e, LaunchError) else "invalid config"
        print(f"qwenvl-train: {what}: {e}", file=sys.stderr)
        sys.exit(2)


def _launch(cfg: TrainConfig, callbacks: list[TrainerCallback], lock: RunLock | None) -> None:
    if lock is not None:
        failfast.at_hard_exit(lock.release)
    _setup_logging(cfg.run_dir)
    from qwenvl_train.training.run import run

    try:
        summary = run(cfg, callbacks)
    except ConfigError as e:  # what this machine cannot run (run's first check; on every rank)
        print(f"qwenvl-train: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"qwenvl-train: aborted by Ctrl-C, nothing more saved; rerun the same command "
              f"to continue from the last checkpoint in {cfg.run_dir}/checkpoints (if any)",
              file=sys.stderr)
        sys.exit(INTERRUPTED)
    except Exception as e:
        from qwenvl_train.cli.failures import report_failure

        failfast.hard_exit(*report_failure(e, cfg.run_dir, int(os.environ.get("RANK", 0))))
    finally:
        if lock is not None:
            lock.release()
    if summary.get("stop_signal") == signal.SIGINT:
        sys.exit(INTERRUPTED)


def _hydra_app() -> None:
    import hydra

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def app(raw: DictConfig) -> None:
        _launch(*_checked(raw, []))

    app()


def _split_config_dirs(args: list[str]) -> tuple[list[str], list[Path]]:
    """Take out `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`): folders of your own
    config groups (DIR/data/mine.yaml -> `data=mine`), searched after ours as with Hydra's
    flag; the rest of `args` comes back with the equivalent `hydra.searchpath` override."""
    out, dirs, rest = [], [], iter(args)
    for arg in rest:
        if arg in ("--config-dir", "-cd"):
            dirs.append(Path(next(rest, "")).resolve())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]).resolve())
        else:
            out.append(arg)
    if dirs:
        out.insert(0, f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    return out, dirs


USAGE = """usage: qwenvl-train [--config-dir DIR] [key=value ...]

Train one stage of a Qwen-VL-style model, e.g.
  qwenvl-train stage=pretrain model=tiny data=demo scale=demo
  torchrun --nproc_per_node=8 -m qwenvl_train.cli.train stage=multitask model=qwenvl_7b ...
"""
USAGE_END = """
Every key can be set with key=value (stage.steps=100, run_dir=runs/x, ...); print them all
with `qwenvl-train --cfg job [key=value ...]`. --config-dir DIR adds config groups of your
own (DIR/data/mine.yaml -> data=mine). Rerunning with the same run_dir resumes; Ctrl-C saves
a checkpoint and stops. Hydra's own flags: --hydra-help."""


def _help(config_dirs: list[Path]) -> str:
    """Usage and every config group's options (ours and the --config-dir folders'). Ours,
    not Hydra's: Hydra's help also lists its own groups and takes ~1.5 CPU s."""
    defaults = {k: v for entry in OmegaConf.load(CONFIG_DIR / "train.yaml").defaults
                if isinstance(entry, DictConfig) for k, v in entry.items()}
    lines = [USAGE, "Configuration groups (group=option):"]
    for group in sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()):
        options = sorted({f.stem for d in (CONFIG_DIR, *config_dirs)
                          for f in (d / group).glob("*.yaml")})
        marked = [f"{o} (default)" if o == defaults.get(group) else o for o in options]
        lines.append(f"  {group}: {', '.join(marked)}")
    return "\n".join(lines) + "\n" + USAGE_END


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failfast.die_with_launcher()  # a torchrun worker ends with torchrun
    overrides, config_dirs = _split_config_dirs(sys.argv[1:])
    if any(arg in ("--help", "-h") for arg in overrides):
        print(_help(config_dirs))
        return
    if any(arg.startswith("-") for arg in overrides):
        _hydra_app()  # --cfg, --info, --multirun, --hydra-help, ...
    else:
        _launch(*_checked(None, overrides))


if __name__ == "__main__":
    main()
