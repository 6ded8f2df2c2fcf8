"""One run per run directory: an exclusive lock that rank 0 holds for the whole run.

`run_dir/run.lock` holds its holder's host, pid, process start time and start date
(JSON), and the holder keeps an `flock` on it (released by the kernel however the process
ends). Taking the lock:
* the flock is held by a live process (on this host; on network file systems with working
  locks, on any) -> refused, naming the holder;
* the file names another host -> refused, naming the host and how to remove the lock
  (whether that run is alive cannot be told from here);
* it names this host and that process is not running (or the pid now belongs to another
  process: its start time differs) -> stale: taken over with a warning.
It is removed when the run ends, also after a handled error; a run killed with SIGKILL
leaves it behind, and the next launch on the same host finds it stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from qwenvl_train.checks import LaunchError

LOCK_FILE = "run.lock"
log = logging.getLogger("qwenvl_train")


class RunLockError(LaunchError):
    """Another run holds this run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    now = _start_time(pid)
    return start is None or now is None or now == start


class RunLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                state = _flock(fd)
                if state != "held" and os.fstat(fd).st_ino != _inode(path):
                    os.close(fd)  # removed by its holder meanwhile: open the new one
                    continue
                _refuse_if_held(path, _read(fd), state)
                cls._write_own(fd)
                return cls(path, fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    @staticmethod
    def _write_own(fd: int) -> None:
        pid = os.getpid()
        info = {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock (idempotent)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_ino == _inode(self.path):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _read(fd: int) -> dict | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {"unreadable": True}
    except ValueError:
        return {"unreadable": True}


def _flock(fd: int) -> str:
    """"ours", "held" (by a live process), or "unsupported" (no flock on this file system)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "ours"
    except BlockingIOError:
        return "held"
    except OSError:
        return "unsupported"


def _refuse_if_held(path: Path, holder: dict | None, state: str) -> None:
    if holder is None and state != "held":
        return
    holder = holder or {}
    host, pid = holder.get("host", "?"), int(holder.get("pid", -1))
    who = f"pid {pid} on host {host}, started {holder.get('started', '?')}"
    if state == "held" or (host == socket.gethostname()
                           and _running(pid, holder.get("pid_start"))):
        raise RunLockError(f"run_dir: {path.parent} is in use by {who}; wait for it to "
                           "finish or stop it, or pass another run_dir")
    if host != socket.gethostname() and "unreadable" not in holder:
        raise RunLockError(
            f"run_dir: {path.parent} is locked by {who} (another host: this one cannot "
            f"tell whether that run is alive). Check on {host}; if no run is there, remove "
            f"{path} and launch again")
    log.warning("run lock: %s was left by %s, which is not running; taking it over", path,
                who)


def lock_holder(run_dir: str | Path) -> dict | None:
    """Who holds `run_dir`'s lock, with "stale": True when that process is gone (same
    host); None without a lock file."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        holder = _read(fd) or {}
    finally:
        os.close(fd)
    same_host = holder.get("host") == socket.gethostname()
    alive = _running(int(holder.get("pid", -1)), holder.get("pid_start"))
    return {**holder, "stale": same_host and not alive}
