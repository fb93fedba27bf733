"""Logging on stderr: structlog JSON lines (one event per line, context bound), or, for a
person at a terminal, only warnings and errors as readable lines beside a progress bar.

core/ logs through the standard library (it must not depend on the job); `configure` routes
those records, warnings and up, into the same stream and format (event = the message,
`logger` = where it came from), so a platform's log parser sees one format.

Credentials written into a URL (`--s3-endpoint-url http://user:secret@host`) reach error
messages through the libraries that use it: every string logged, and every error printed,
has them replaced by *** first (`redact`), as entrypoint.sh does for the command line; so
has the traceback of an error nothing caught.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import traceback

import structlog


# scheme://user:password@ up to the last @ of the URL (passwords are not always escaped)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/'\"@]*(?:@[^\s/'\"@]*)*@")


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by ***."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def _redacted(_logger: object, _method: str, event: dict) -> dict:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
        elif isinstance(value, (list, tuple)):
            event[key] = [redact(item) if isinstance(item, str) else item for item in value]
    return event


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
            _redacted,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING if people else logging.INFO),
        # One write per line: the workers share the parent's stderr, and print() would
        # write the newline separately, letting lines of two processes run together.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    sys.excepthook = _print_redacted
    threading.excepthook = _print_redacted_thread
    root = logging.getLogger()
    root.handlers = [handler for handler in root.handlers if not isinstance(handler, _StdlibToStructlog)]
    root.addHandler(_StdlibToStructlog(logging.WARNING))


def _print_redacted(kind: type[BaseException], value: BaseException | None, tb: object) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))  # type: ignore[arg-type]


def _print_redacted_thread(hook: threading.ExceptHookArgs) -> None:
    if hook.exc_type is SystemExit:
        return
    sys.stderr.write(f"Exception in thread {hook.thread.name if hook.thread else '?'}:\n")
    _print_redacted(hook.exc_type, hook.exc_value, hook.exc_traceback)


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
