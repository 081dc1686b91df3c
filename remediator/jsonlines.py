"""Reading JSON-lines files (recordings, audit logs): every problem located, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import RemediatorError


def read_json_lines(path: str | Path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of `path`; `what` names a line in errors."""
    path = Path(path)
    try:
        handle = path.open()
    except OSError as exc:
        raise RemediatorError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RemediatorError(f"{path}:{number}: not {what}: {exc.msg}") from None
