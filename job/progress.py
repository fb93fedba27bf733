"""Progress and ETA for long work, reported at most every `interval` seconds."""
from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """Counts reads and input bytes; calls `report` with rate and ETA now and then.

    The ETA is taken from the share of input bytes consumed, which is known up front for
    any file, where a read count would need a second pass over the input.
    """

    def __init__(self, total_bytes: int, report: Callable[..., None], interval: float = 30.0) -> None:
        self.total_bytes = total_bytes
        self.report = report
        self.interval = interval
        self.reads = 0
        self.started = self.last = time.monotonic()

    def update(self, reads: int, bytes_done: int) -> None:
        self.reads += reads
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.report(**self.figures(bytes_done, now))

    def figures(self, bytes_done: int, now: float | None = None) -> dict[str, float | int | None]:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        share = bytes_done / self.total_bytes if self.total_bytes else 1.0
        eta = elapsed * (1 - share) / share if share > 0 else None
        return {
            "reads": self.reads,
            "reads_per_s": round(self.reads / elapsed, 1),
            "input_done": round(share, 4),
            "eta_s": None if eta is None else round(eta, 1),
        }
