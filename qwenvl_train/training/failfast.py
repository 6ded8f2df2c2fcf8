"""Ending a run promptly when it cannot go on, on every rank.

Three ways a multi-rank run used to outlive its failure, and what this module does:

* One rank raises (bad data, the NaN policy, a damaged checkpoint) and exits; the others sit
  in a collective with it. gloo raises as soon as the peer's socket closes, NCCL waits for
  its timeout (30 min). So the failing rank posts its message under one key of the
  launcher's TCPStore before it exits (`announce_failure`), and a watch thread on every rank
  polls that key: a rank that sees it exits within `POLL_S` seconds, naming the failed rank.
* SIGTERM (preemption, or torchrun stopping the other ranks after a failure) and Ctrl-C
  set a flag that the loop reads at step boundaries (trainer.PreemptionFlag). A rank
  blocked in a collective never runs that Python handler: Python runs handlers between
  bytecodes of the main thread. The C-level handler still writes the signal number to the
  wakeup fd, so the watch thread learns of the signal and gives the loop `grace_s` to
  reach its next step boundary (`progress()`); a rank that does not is stuck and exits
  (128 + the signal number, as if the signal had ended it). Saves (`busy()`) are not
  timed: torchrun's shutdown timeout bounds them.
* torchrun starts each worker in a session of its own, so killing torchrun's process group
  (or torchrun dying) left the workers training. `die_with_launcher` asks the kernel to
  send the worker SIGTERM when torchrun goes (it then saves and exits as on preemption).

`hard_exit` is the one way out after a fatal error: it runs the registered exit hooks (the
run lock) and ends the process without waiting on DataLoader workers or process-group
teardown. Nothing here imports torch at module level (the CLI imports it before validation).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import NoReturn

POLL_S = 2.0
_WATCHED = {int(signal.SIGTERM), int(signal.SIGINT)}
_exit_hooks: list[Callable[[], None]] = []
_watch: _Watch | None = None


def _key() -> str:
    # One key per torchrun attempt: a restarted group must not see the last one's failure.
    return f"qwenvl/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _connect(timeout_s: float):
    """A client of the rendezvous store (torchrun's agent, or rank 0 without torchrun);
    None for a single process or when it cannot be reached."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not host or not port:
        return None
    try:
        from torch.distributed import TCPStore

        return TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                        timeout=timedelta(seconds=timeout_s))
    except Exception:  # the store is gone (launcher died) or not there yet
        return None


def announce_failure(rank: int, message: str) -> None:
    """Tell the other ranks that this one failed (first failure wins; best effort)."""
    if _watch is not None:
        _watch.announced = True
    store = _watch.store if _watch is not None and _watch.store is not None else _connect(5)
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.compare_set(_key(), "", f"rank {rank}: {message}")


def peer_failure(rank: int) -> str | None:
    """The failure another rank announced ("rank N: message"), if any."""
    store = _watch.store if _watch is not None and _watch.store is not None else _connect(2)
    if store is None:
        return None
    try:
        if not store.check([_key()]):
            return None
        note = store.get(_key()).decode(errors="replace")
    except Exception:
        return None
    return None if note.startswith(f"rank {rank}:") else note


def at_hard_exit(hook: Callable[[], None]) -> None:
    """Run `hook` (e.g. releasing the run lock) before `hard_exit` ends the process."""
    _exit_hooks.append(hook)


def hard_exit(code: int, message: str | None = None) -> NoReturn:
    """Print `message`, run the exit hooks, flush, and end the process now."""
    if message:
        with contextlib.suppress(OSError):
            os.write(2, (message.rstrip("\n") + "\n").encode())
    for hook in _exit_hooks:
        with contextlib.suppress(Exception):
            hook()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class _Watch:
    """The watch thread: peers' failure notes, and signals the main thread cannot handle."""

    def __init__(self, rank: int, grace_s: float) -> None:
        self.rank, self.grace_s = rank, grace_s
        self.store = _connect(30)
        self.announced = False
        self.signal_at: float | None = None
        self.signum = 0
        self.last_progress = time.monotonic()
        self.busy = 0
        self.wakeup: socket.socket | None = None
        self._reader: socket.socket | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwenvl-failfast", daemon=True)
        self._thread.start()

    def watch_signals(self) -> None:
        if self._reader is not None or threading.current_thread() is not threading.main_thread():
            return
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            reader.close()
            writer.close()
            return
        self._reader, self.wakeup = reader, writer

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._closed.is_set():
            reader = self._reader
            if reader is None:
                self._closed.wait(0.2)
            else:
                ready, _, _ = select.select([reader], [], [], 0.2)
                if ready:
                    self._note_signals(reader)
            now = time.monotonic()
            if self.signal_at is not None and not self.busy:
                waited = now - max(self.signal_at, self.last_progress)
                if waited > self.grace_s:
                    hard_exit(128 + self.signum, (
                        f"qwenvl-train: rank {self.rank} got {signal.Signals(self.signum).name} "
                        f"{waited:.0f}s ago and has not reached the next step boundary "
                        f"(stop_grace_s={self.grace_s:g}): it is blocked, most likely in a "
                        "collective whose peer is gone; exiting without a checkpoint"))
            if self.store is not None and now >= next_poll and not self.announced:
                next_poll = now + POLL_S
                note = peer_failure(self.rank)
                if note and not self.announced:
                    hard_exit(1, f"qwenvl-train: rank {self.rank} stops: {note}")

    def _note_signals(self, reader: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            for signum in reader.recv(64):
                if signum in _WATCHED and self.signal_at is None:
                    self.signal_at = time.monotonic()
                    self.signum = signum

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        if self._reader is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            for s in (self._reader, self.wakeup):
                s.close()
            self._reader = self.wakeup = None


def start(rank: int, grace_s: float) -> None:
    """Start this process's watch thread (after the process group exists)."""
    global _watch
    if _watch is None:
        _watch = _Watch(rank, grace_s)


def stop() -> None:
    global _watch
    if _watch is not None:
        _watch.close()
        _watch = None


def watch_signals() -> None:
    """Called where a Python SIGTERM handler is installed: from now on a SIGTERM that the
    main thread cannot act on within `grace_s` ends the process (no-op before `start`)."""
    if _watch is not None:
        _watch.watch_signals()


def progress() -> None:
    """The loop passed a step boundary (its stop check)."""
    if _watch is not None:
        _watch.last_progress = time.monotonic()


@contextlib.contextmanager
def busy() -> Iterator[None]:
    """A checkpoint save: legitimately long, not timed after a signal."""
    if _watch is None:
        yield
        return
    _watch.busy += 1
    try:
        yield
    finally:
        _watch.busy -= 1
        _watch.last_progress = time.monotonic()


def die_with_launcher() -> None:
    """A torchrun worker: receive SIGTERM when torchrun dies (Linux `PR_SET_PDEATHSIG`)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:  # torchrun died before the request took effect
        hard_exit(1, "qwenvl-train: the launcher (torchrun) is gone; exiting")
