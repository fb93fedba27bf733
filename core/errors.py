"""Errors that core/ raises for problems the user can fix, so callers can report them plainly."""
import re


class UserError(Exception):
    """A problem the user can fix (input, model or argument): the message names it and the fix.

    The one base class of such errors: the CLI and the workers print it in one line, without a
    traceback, and exit 65; any other exception is a bug (exit 1).
    """


class ModelLoadError(UserError, ValueError):
    """A model source (directory, hub id or weight file) cannot be loaded as given.

    The message names the source and says what to do; callers print it without a traceback.
    torch's advice to load with `weights_only=False` (or to allow-list a global) is never
    passed on: either would run whatever code the file carries.
    """

    def __init__(self, message: str) -> None:
        super().__init__(without_unsafe_advice(message))


def without_unsafe_advice(message: str) -> str:
    """`message` without torch's advice to unpickle a refused file unsafely; says what was refused."""
    if "weights_only" not in message and "safe_globals" not in message:
        return message
    head = re.split(r"Weights only load failed|WeightsUnpickler", message)[0].rstrip(" (:\n\t")
    needed = re.search(r"GLOBAL ([\w.]+)", message)
    what = (f"it needs the global {needed.group(1)}, which could run code when loaded"
            if needed else "it holds objects other than tensors, which could run code when loaded")
    return f"{head}: refused: {what}" if head else f"refused: {what}"


class NonFiniteEmbedding(RuntimeError):
    """An encoder produced NaN or Inf for some inputs: a numerical fault, never silently kept.

    `indices` are the offending inputs' positions in the call; the message names them (or
    the frame ids the caller passes in).
    """

    def __init__(self, model: str, indices: list[int], names: list[str] | None = None) -> None:
        self.model, self.indices = model, indices
        shown = names if names is not None else [str(i) for i in indices]
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        super().__init__(f"{model} produced NaN/Inf embeddings for {len(shown)} input(s): "
                         f"{', '.join(shown[:10])}{more}")
