"""Errors a user can act on.

HvError carries a message that says what to do; the CLI prints it and exits
with status 2 instead of showing a traceback.
"""


class HvError(Exception):
    """A failure whose message tells the user what to do about it."""

    exit_status = 2


class GuestMemoryError(HvError, ValueError):
    """An access outside guest RAM."""
