"""Fault injection for the crash-safety tests, off unless QWENVL_FAULT names a point.

QWENVL_FAULT=kill_after_step:5     SIGKILL this process after step 5 was logged
QWENVL_FAULT=kill_in_save:4        SIGKILL during the save of step 4 (after DeepSpeed wrote)
QWENVL_FAULT=nan_loss:3            the last rank's loss at step 3 becomes NaN
"""

from __future__ import annotations

import os
import signal


def armed(point: str) -> bool:
    return os.environ.get("QWENVL_FAULT") == point


def kill_if_armed(point: str) -> None:
    if armed(point):
        os.kill(os.getpid(), signal.SIGKILL)
