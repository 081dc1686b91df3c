"""The daemon's own bounded rolling recording: every tick's Sample, as `remediator record` writes them.

`[recording] path` in the config (or `remediator run --record FILE`) turns it on. The file is cut
over to `PATH.1` (replacing the older one) once it would pass half of `max_bytes`, so the two files
together never exceed `max_bytes`, and the newest samples are always kept: after an incident,
`remediator report` and `remediator replay` read `PATH.1` then `PATH` (see recording_files).

Files are opened through trustedfs like the audit log: a root daemon never writes through a link
or in a directory another user could swap. A failed write is counted, never raised: the daemon
must keep guarding the service when the disk is full.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .errors import RemediatorError
from .sample import Sample
from .trustedfs import Trust, TrustedDirectory

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def recording_files(path: str | Path) -> list[Path]:
    """The files of a rolling recording, oldest first: PATH.1 (if any), then PATH."""
    path = Path(path)
    older = rotated_path(path)
    return ([older] if older.exists() else []) + [path]


class RollingRecording:
    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, trust: Trust | None = None):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.trust = trust
        self.failures: dict[str, int] = {}
        self.dropped = 0  # samples larger than half of max_bytes: they could never fit
        self._fd: int | None = None
        try:
            self._directory = TrustedDirectory(self.path.parent, trust, create_mode=0o750, shown=str(self.path))
        except OSError as exc:
            raise RemediatorError(f"cannot open the recording {self.path}: {exc.strerror or exc}") from None
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        try:
            return self._directory.open(self.path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise RemediatorError(f"cannot open the recording {self.path}: {exc.strerror or exc}") from None

    def write(self, sample: Sample) -> bool:
        """Append one sample; False when it was dropped or the file system refused it (counted)."""
        line = (json.dumps(sample.to_json(), separators=(",", ":")) + "\n").encode()
        half = self.max_bytes // 2
        if len(line) > half:
            self.dropped += 1
            return False
        try:
            if self._fd is None:  # an earlier cut-over could not open the new file: try again
                self._fd = self._open()
                self._size = os.fstat(self._fd).st_size
            if self._size + len(line) > half:
                self._rotate()
            written = os.write(self._fd, line)
            if written != len(line):
                os.ftruncate(self._fd, self._size)  # no torn line: the file stays one sample per line
                raise OSError(errno.ENOSPC, "short write")
            self._size += written
            return True
        except (OSError, RemediatorError) as exc:
            code = getattr(exc, "errno", None)
            name = errno.errorcode.get(code, "error") if code else "error"
            self.failures[name] = self.failures.get(name, 0) + 1
            return False

    def _rotate(self) -> None:
        self._directory.rename(self.path.name, rotated_path(self.path).name)  # replaces the older one
        os.close(self._fd)
        self._fd = None
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._directory.close()


def open_recording(path: Path | None, max_bytes: int, trust: Trust | None = None) -> "RollingRecording | None":
    """The daemon's recorder: None when no path is configured (recording off)."""
    return None if path is None else RollingRecording(path, max_bytes, trust)
