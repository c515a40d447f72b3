"""The errors and notes that reach the user: one line naming the file, the problem and the fix."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the file, the problem and the fix."""


class InputNote(UserWarning):
    """How an input was read when it was not the plain case (e.g. a multi-channel label map):
    one sentence naming the file, shown to the user (the CLI prints ``deepwarp: note: ...``)."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message names the file and the field."""
