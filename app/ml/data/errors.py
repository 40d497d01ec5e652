"""Errors and problem records that speak to the user: which concept, which file, what to do.

Bad input is never dropped silently. In "skip" mode problems are collected as `Problem`
records in a report the user sees before training; in "error" mode a `DataError` stops the
run before training starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(Exception):
    """A data problem the user must fix; the message names the file (and concept) and the fix."""

    def __init__(self, message: str, path: str | Path | None = None, concept: str | None = None):
        self.path = str(path) if path is not None else None
        self.concept = concept
        self.reason = message
        super().__init__(_format(message, self.path, concept))


class DataCancelled(Exception):
    """Raised when the caller's check_cancel() asked us to stop."""


@dataclass(frozen=True)
class Problem:
    """One skipped or suspicious input, kept for the report instead of being dropped silently."""

    path: str
    message: str
    concept: str = ""
    severity: str = "error"  # "error": the file is not used; "warning": used, but check it

    def __str__(self) -> str:
        return f"{self.severity}: " + _format(self.message, self.path, self.concept or None)

    def to_error(self) -> DataError:
        return DataError(self.message, self.path, self.concept or None)


def _format(message: str, path: str | None, concept: str | None) -> str:
    where = []
    if concept:
        where.append(f"concept '{concept}'")
    if path:
        where.append(path)
    return f"{', '.join(where)}: {message}" if where else message


def check_cancelled(check_cancel) -> None:
    """Call the caller's cancel hook; it may raise its own exception or return True to stop."""
    if check_cancel is not None and check_cancel():
        raise DataCancelled("cancelled")
