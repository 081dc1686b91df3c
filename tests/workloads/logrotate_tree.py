"""A process tree like logrotate compressing a log: a parent named `logrotate` and its child
named `gzip` (both renamed with prctl, as the kernel shows real ones).

  python3 logrotate_tree.py            prints "ready pid=<parent> child=<child>"

The child compresses in short bursts (light load), the parent waits for it. Both end when the test
kills the process group.
"""

from __future__ import annotations

import os
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import announce_ready, set_thread_name  # noqa: E402


def child(ready_fd: int) -> None:
    set_thread_name("gzip")
    os.write(ready_fd, b"x")
    os.close(ready_fd)
    data = os.urandom(64 * 1024)
    while True:
        deadline = time.monotonic() + 0.01
        while time.monotonic() < deadline:
            zlib.compress(data, 6)
        time.sleep(0.09)


def main() -> None:
    set_thread_name("logrotate")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child(write_fd)
        os._exit(0)
    os.close(write_fd)
    os.read(read_fd, 1)  # the child has its name before anyone looks
    announce_ready(child=pid)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
