"""User-facing errors: the CLI turns these into one line on stderr and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class CryosiftError(Exception):
    """Bad input or an impossible request; the message names the file and the problem."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(CryosiftError):
    """An input file is missing, unreadable, corrupt or inconsistent."""


class OutputError(CryosiftError):
    """An output file cannot be written (disk full, no permission, ...); nothing was saved and
    any previous file at that path is kept."""
