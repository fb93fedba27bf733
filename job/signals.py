"""SIGTERM and SIGINT set a stop event, without a lock taken in a signal handler.

The obvious handler, `lambda *_: stop.set()`, can hang the process: Python runs a handler on
the main thread between two bytecodes, and when those are inside `stop.wait()` (the main
loops wait on the stop event) the event's lock is held; `set()` then waits for that same
lock, which is not re-entrant, and never returns. The stop is lost and the process is
killed at the end of the grace period with its lease still held.

So the handler does nothing in Python: the interpreter's C handler writes the signal
number to a pipe (`signal.set_wakeup_fd`), and a thread reading the pipe sets the event,
taking the lock like any other thread.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Set `stop` on SIGTERM or SIGINT from now on; returns the function that puts the
    previous handlers back. Call from the main thread."""
    read, write = os.pipe()
    os.set_blocking(write, False)  # the C handler must never block on a full pipe
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    previous = {signum: signal.signal(signum, _noted) for signum in STOP_SIGNALS}
    wanted = {int(signum) for signum in STOP_SIGNALS}

    def watch() -> None:
        while data := os.read(read, 64):  # b"" once restore() closed the pipe
            if wanted.intersection(data):
                stop.set()
        os.close(read)

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write)

    return restore


def _noted(_signum: int, _frame: object) -> None:
    """A Python handler, so the signal does not kill the process: the pipe carries it."""
