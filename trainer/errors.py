"""The one exception type for a user's mistake (a missing path, a bad flag, an unsupported combination, bad
data): the `fastrlhf` command prints its message as one line and exits 2; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message says what was wrong and what works instead."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user gave does not exist or is not what the command needs."""


class MissingPackageError(UserError, ImportError):
    """An optional package the chosen option needs does not import."""
