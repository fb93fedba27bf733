"""Logging on stderr: structlog JSON lines (one event per line, context bound), or, for a
person at a terminal, only warnings and errors as readable lines beside a progress bar.

core/ logs through the standard library (it must not depend on the job); `configure` routes
those records, warnings and up, into the same stream and format (event = the message,
`logger` = where it came from), so a platform's log parser sees one format.
"""
from __future__ import annotations

import logging
import sys

import structlog


def for_people(log_format: str = "json") -> bool:
    """Whether this process logs for a person: --log-format auto and stderr is a terminal."""
    return log_format == "auto" and sys.stderr.isatty()


def configure(log_format: str = "json") -> None:
    """JSON lines on stderr with an ISO timestamp and the level; call once per process.

    With `for_people(log_format)`, warnings and errors only, as readable lines: the job shows
    its progress as a bar (job/batch.py) instead of the info events.
    """
    people = for_people(log_format)
    renderer = structlog.dev.ConsoleRenderer(colors=False) if people else structlog.processors.JSONRenderer(sort_keys=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING if people else logging.INFO),
        # One write per line: the workers share the parent's stderr, and print() would
        # write the newline separately, letting lines of two processes run together.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [handler for handler in root.handlers if not isinstance(handler, _StdlibToStructlog)]
    root.addHandler(_StdlibToStructlog(logging.WARNING))


class _StdlibToStructlog(logging.Handler):
    """Standard-library log records (core/'s warnings) as structlog events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_logger(logger=record.name).log(record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)


def _stderr_logger(*_args: object) -> structlog.WriteLogger:
    """A logger writing to sys.stderr as it is when the logger is made, not as it was when
    `configure` ran: whoever swaps the stream later (pytest between tests) is followed."""
    return structlog.WriteLogger(sys.stderr)


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger().bind(**context)
