"""How `qwenvl-train` reports a run that failed: one message per rank, then a hard exit.

* A `RunError` (bad data, the NaN policy, a damaged or unwritable checkpoint) is explained
  by its message: printed without a traceback. So is a full disk (ENOSPC) anywhere else
  (the export, the logs).
* A rank that stopped because another one failed (its collective raised, or the other
  rank's failure note is in the store) says so and names that rank's message.
* Anything else is a bug or an environment problem: one line first (what failed, where the
  run directory is, how to resume), then the traceback.
`HYDRA_FULL_ERROR=1` or `QWENVL_DEBUG=1` adds the traceback to every case. The failing rank
posts its message for the other ranks (training/failfast.py), which then exit too.
"""

from __future__ import annotations

import errno
import os
import traceback

from qwenvl_train.checks import RunError
from qwenvl_train.training import failfast
from qwenvl_train.training.checkpoint_files import checkpoint_dir, read_latest

# What gloo and NCCL say when the peer of a collective is gone.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "ncclRemoteError")


def _debug() -> bool:
    return "1" in (os.environ.get("HYDRA_FULL_ERROR"), os.environ.get("QWENVL_DEBUG"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as the text other writers (safetensors, torch) turn it into."""
    return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or "No space left on device" in str(error))


def _lost_peer(error: BaseException) -> bool:
    import torch.distributed as dist

    dist_errors = tuple(getattr(dist, n) for n in ("DistNetworkError", "DistBackendError")
                        if hasattr(dist, n))
    return isinstance(error, dist_errors) or any(s in str(error) for s in _PEER_LOST)


def resume_hint(run_dir: str) -> str:
    latest = read_latest(checkpoint_dir(run_dir))
    if latest.tag:
        return f"run dir {run_dir}: rerun the same command to resume from {latest.tag}"
    return f"run dir {run_dir}: no checkpoint was written; a rerun starts from step 1"


def report_failure(error: Exception, run_dir: str, rank: int) -> tuple[int, str]:
    """(exit code, the message to print) for an exception out of the run; posts this
    rank's failure for the others when it is the cause."""
    where = f"qwenvl-train: rank {rank}"
    note = None if isinstance(error, RunError) else failfast.peer_failure(rank)
    if note is not None or (not isinstance(error, RunError) and _lost_peer(error)):
        cause = note or ("lost contact with another rank, which failed or was killed (its "
                         f"message is above): {_first_line(error)}")
        text, show_traceback = f"{where} stops: {cause}", _debug()
    elif isinstance(error, RunError):
        text, show_traceback = f"{where}: {error}", _debug()
        failfast.announce_failure(rank, f"{type(error).__name__}: {_first_line(error)}")
    elif _disk_full(error):
        text = (f"{where}: the disk is full (no space left on device): {type(error).__name__}:"
                f" {_first_line(error)}; free space on {run_dir}'s file system")
        show_traceback = _debug()
        failfast.announce_failure(rank, f"disk full: {_first_line(error)}")
    else:
        text = f"{where}: training failed: {type(error).__name__}: {_first_line(error)}"
        show_traceback = True
        failfast.announce_failure(rank, f"{type(error).__name__}: {_first_line(error)}")
    from qwenvl_train.training.checkpoint import CheckpointError

    if not isinstance(error, CheckpointError):  # that message says what to do already
        text += f"\n  {resume_hint(run_dir)}"
    if show_traceback:
        tb = "".join(traceback.format_exception(error))
        text = f"{text}\n{tb}{text.splitlines()[0]}"  # the line first and last
    return 1, text
