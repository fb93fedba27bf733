"""Errors the batch job turns into exit codes: the message tells the user what to do."""
from __future__ import annotations

import errno

from core.errors import UserError
from job import exit_codes


class BadInput(UserError):
    """Missing, changed or unusable input or output, or arguments that contradict the run (exit 65).

    The message names the URI and the fix; it is printed without a traceback.
    """


class RunDamaged(Exception):
    """The run's records in the store do not add up (a bug, or objects deleted or edited by
    hand): the merge stops before any output is visible (exit 1, one line, no traceback)."""


class Interrupted(Exception):
    """Stopped by SIGTERM, SIGINT or a spot notice before finishing; rerun to resume (exit 75)."""


# A full disk may have room again, or the job a machine with room (a retry): exit 75. A
# read-only or forbidden one needs a fix first: exit 65.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error_code(exc: BaseException) -> int | None:
    """The exit code for a local disk that is full (75) or read-only (65); None otherwise."""
    if not isinstance(exc, OSError) or getattr(exc, "errno", None) is None:
        return None
    if exc.errno in _DISK_FULL:
        return exit_codes.INTERRUPTED
    if exc.errno in _DISK_REFUSED:
        return exit_codes.BAD_INPUT
    return None


def disk_error_message(exc: OSError) -> str:
    """One line for a local disk error: what, where, and what to do."""
    # A copy or rename names its source first and its destination, the disk written, second.
    target = exc.filename2 or exc.filename
    where = f" writing {target}" if target else ""
    if exc.errno in _DISK_FULL:
        return f"no space left on the local disk{where}; free space (or use a larger disk) and rerun the same command"
    return f"cannot write to the local disk{where} ({exc.strerror}); make it writable and rerun the same command"


def user_error_code(exc: BaseException) -> int | None:
    """65 for a problem the user can fix (bad input, model or arguments), else None."""
    return exit_codes.BAD_INPUT if isinstance(exc, (UserError, FileNotFoundError)) else None
