"""structlog JSON lines on stderr: one event per line, context (run_id, shard, worker) bound."""
from __future__ import annotations

import logging
import sys

import structlog


def configure() -> None:
    """JSON lines on stderr with an ISO timestamp and the level; call once per process."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # One write per line: the workers share the parent's stderr, and print() would
        # write the newline separately, letting lines of two processes run together.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: object) -> structlog.WriteLogger:
    """A logger writing to sys.stderr as it is when the logger is made, not as it was when
    `configure` ran: whoever swaps the stream later (pytest between tests) is followed."""
    return structlog.WriteLogger(sys.stderr)


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**context)
