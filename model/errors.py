"""Typed errors that tell the user what to fix in their input."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


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


_stopping_status: int | None = None  # set by stop_with: the process was told to stop (SIGTERM)


def stop_with(status: int) -> NoReturn:
    """From a signal handler: raise SystemExit(status), so `with` blocks and `finally` clauses unwind, and remember
    it. The handler runs wherever the main thread is; inside a confluent-kafka callback (a delivery report, a log
    line of a broker still starting) the library turns the SystemExit into a SystemError, which then unwinds
    instead: exit_status still ends the command with `status`."""
    global _stopping_status
    _stopping_status = status
    sys.exit(status)


def exit_status(main: Callable[[], int | None], name: str) -> int:
    """Run a command's main: its status, or 2 with "name: error: message" on stderr for an HRNNError (bad
    input, said plainly, no traceback), or 130 on Ctrl-C, or the status of a stop_with whatever it became."""
    try:
        return int(main() or 0)
    except HRNNError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        if _stopping_status is not None:
            return _stopping_status
        raise
