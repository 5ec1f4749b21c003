"""The one error type a user can cause and fix: the CLI prints it as one line (plus a hint), exit status 2, no
traceback unless ``--debug``. Every room raises it (or a subclass) for bad input, never for its own bugs."""
from __future__ import annotations


class UserError(Exception):
    """Bad input, configuration or state that the user can fix; ``str(exc)`` names the file, record or field and
    says what to do. ``hint`` is an optional second line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
