"""A log shipper that forks its compressors: a parent named `vector` that only waits, and
children named `xz` and `gzip` (renamed with prctl, as the kernel shows real ones) that compress
flat out, each pinned to --cpu.

  python3 shipper_tree.py --children 2 --cpu 0    prints "ready pid=<parent> children=<a>,<b>"

Everything ends when the test kills the process group.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import announce_ready, set_thread_name  # noqa: E402

NAMES = ("xz", "gzip")


def compressor(name: str, cpu: int | None, ready_fd: int) -> None:
    set_thread_name(name)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.write(ready_fd, b"x")
    os.close(ready_fd)
    data = os.urandom(64 * 1024)
    while True:
        zlib.compress(data, 6)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--cpu", type=int, default=None)
    args = parser.parse_args()
    set_thread_name("vector")
    children = []
    for index in range(args.children):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            compressor(NAMES[index % len(NAMES)], args.cpu, write_fd)
            os._exit(0)
        os.close(write_fd)
        os.read(read_fd, 1)  # the child has its name and CPU before anyone looks
        os.close(read_fd)
        children.append(pid)
    announce_ready(children=",".join(map(str, children)))
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
