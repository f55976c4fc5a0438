"""Typed errors that tell the user what to fix in their input."""
from __future__ import annotations

import sys
from typing import Callable


class HRNNError(Exception):
    """Base class: every error the CLI reports as a clear message and a non-zero exit."""


class DataError(HRNNError):
    """An interactions file cannot be read as the schema expects."""

    def __init__(self, path: str, problem: str, *, line: int | None = None,
                 column: str | None = None, expected: str | None = None) -> None:
        self.path, self.problem, self.line, self.column, self.expected = path, problem, line, column, expected
        where = path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        msg = f"{where}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


class EventError(HRNNError):
    """One event record breaks the event contract; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class ConfigError(HRNNError):
    """A setting is missing, unknown or out of its range."""


class ArtifactError(HRNNError):
    """A model version is unreadable, incomplete or fails validation."""


def exit_status(main: Callable[[], int | None], name: str) -> int:
    """Run a command's main: its status, or 2 with "name: error: message" on stderr for an HRNNError (bad
    input, said plainly, no traceback), or 130 on Ctrl-C."""
    try:
        return int(main() or 0)
    except HRNNError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
