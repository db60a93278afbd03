"""User-facing errors.

Anything a user can cause (a missing file, an unknown model, a bad pattern, a
corrupt checkpoint) raises a ``UserError``. The CLI prints its message as one line
and exits with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input, with a message that says what to do."""

    exit_code = 2


class NoTargetsError(UserError, ValueError):
    """A selection matched no convolution."""


class SourceError(UserError):
    """A model source could not be resolved or built."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, hostile or of the wrong kind."""


class DataError(UserError):
    """A data folder is missing or malformed."""


class VerificationError(UserError):
    """An export did not reproduce its source model; nothing was written."""


class ConfigError(UserError, ValueError):
    """A setting has a value the tool does not know (a gate mode, an implementation)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type if empty): messages built
    from a library's exception stay one line, as the CLI prints them."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
