"""What the daemon could not do and kept running anyway: failed writes and full maps, counted.

None of these stops the loop: a daemon that dies because its log disk filled up leaves the
protected service unguarded, and under `Restart=on-failure` it would come back only to die again.
They are counted here and said in the periodic summary line and the sd_notify STATUS instead.
"""

from __future__ import annotations

import errno
import logging
import sys


def error_name(exc: BaseException) -> str:
    """ENOSPC, EIO, ... for an OSError; the exception's type name otherwise."""
    number = getattr(exc, "errno", None)
    if number:
        return errno.errorcode.get(number, str(number))
    return type(exc).__name__


def describe_counts(counts: dict[str, int]) -> str:
    """{"ENOSPC": 3, "EIO": 1} -> "4 (ENOSPC 3, EIO 1)"."""
    total = sum(counts.values())
    return f"{total} ({', '.join(f'{name} {count}' for name, count in sorted(counts.items()))})"


# Log records that could not be written (stderr on a full disk, journald gone), by error name.
LOG_WRITE_FAILURES: dict[str, int] = {}


class CountingStreamHandler(logging.StreamHandler):
    """A StreamHandler whose failed writes are counted instead of printed: the stream that would
    carry the traceback is the one that failed."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        name = error_name(exc) if exc is not None else "error"
        LOG_WRITE_FAILURES[name] = LOG_WRITE_FAILURES.get(name, 0) + 1
