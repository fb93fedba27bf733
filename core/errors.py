"""Errors that core/ raises for problems the user can fix, so callers can report them plainly."""


class ModelLoadError(ValueError):
    """A model source (directory, hub id or weight file) cannot be loaded as given.

    The message names the source and says what to do; callers print it without a traceback.
    """
