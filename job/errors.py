"""Errors the batch job turns into exit codes: the message tells the user what to do."""
from __future__ import annotations


class BadInput(Exception):
    """Missing, changed or unusable input or output, or arguments that contradict the run (exit 65).

    The message names the URI and the fix; it is printed without a traceback.
    """


class Interrupted(Exception):
    """Stopped by SIGTERM, SIGINT or a spot notice before finishing; rerun to resume (exit 75)."""
