"""Errors that reach the user as one line, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad input, missing data, unreachable database.

    The CLI prints ``error: <message>`` and exits with ``exit_code``; the message
    should say what is wrong and how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class PayloadError(UserError):
    """A weights or gradient blob failed validation (truncated, hostile, wrong shape, NaN)."""
