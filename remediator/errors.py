"""Typed errors. Everything a user can cause ends as one clear line, never a traceback."""

from __future__ import annotations

import errno
from dataclasses import dataclass


class RemediatorError(Exception):
    """Base for errors that the CLI prints as one line and turns into exit status 1."""


class SetupError(RemediatorError):
    """The host lacks something the kernel path needs (root, tracefs, headers, bcc)."""


@dataclass(frozen=True)
class Location:
    """Where in a file a problem is; line and column are 1-based, 0 when unknown."""

    path: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.path}:{self.line}:{self.column or 1}"
        return self.path


class LocatedError(RemediatorError):
    """A problem in an input file, formatted as `file:line:col: error: message`."""

    def __init__(self, location: Location, message: str, severity: str = "error"):
        super().__init__(f"{location}: {severity}: {message}")
        self.location = location
        self.message = message
        self.severity = severity


class ProcessGone(RemediatorError):
    """The process exited (ESRCH/ENOENT) or its pid now names another process.

    This is an ordinary event, not a failure: callers record it and move on.
    """

    def __init__(self, pid: int, detail: str = "process exited"):
        super().__init__(f"pid {pid}: {detail}")
        self.pid = pid


class AccessDenied(RemediatorError):
    """The kernel refused (EPERM/EACCES): a real error with a reason."""

    def __init__(self, pid: int | None, what: str, reason: str = ""):
        text = f"permission denied: {what}" + (f" ({reason})" if reason else "")
        if pid is not None:
            text = f"pid {pid}: {text}"
        super().__init__(text)
        self.pid = pid


def translate_os_error(exc: OSError, pid: int | None, what: str) -> RemediatorError:
    """Map the errno of a failed call on a process to a typed error, in one place."""
    if exc.errno in (errno.ESRCH, errno.ENOENT) and pid is not None:
        return ProcessGone(pid)
    if exc.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(pid, what, exc.strerror or "")
    return RemediatorError(f"{what}: {exc.strerror or exc}" + (f" (pid {pid})" if pid is not None else ""))
