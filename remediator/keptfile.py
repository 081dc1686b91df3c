"""A /proc or /sys file the daemon reads every tick, through one descriptor kept open."""

from __future__ import annotations

import os
from pathlib import Path


class KeptFile:
    """Reads the file through one descriptor, pread from offset 0 (the kernel formats a /proc or
    /sys file afresh on each read from 0), not an open, a path walk and a close per read. A failed
    read closes the descriptor and raises OSError; the next read opens the file again."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.fd: int | None = None

    def read(self, size: int = 65536) -> bytes:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(self.fd, size, 0)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
