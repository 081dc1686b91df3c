"""A log shipper whose CPU is burnt by the compressors it forks: a parent named `vector` keeps
CHILDREN children named `xz` and `gzip` compressing; each child exits after LIFE s and is replaced
by a new one, so the culprits are short-lived processes, not the idle parent.

  python3 shipper.py --children 2 --life 1.0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def compressor(name: str, life: float) -> None:
    set_thread_name(name)
    data = os.urandom(64 * 1024)
    deadline = time.monotonic() + life
    while time.monotonic() < deadline:
        zlib.compress(data, 6)
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--life", type=float, default=1.0)
    args = parser.parse_args()
    set_thread_name("vector")
    announce_ready()
    names = ("xz", "gzip")
    running: set[int] = set()
    started = 0
    while True:
        while len(running) < args.children:
            pid = os.fork()
            if pid == 0:
                compressor(names[started % 2], args.life)
            running.add(pid)
            started += 1
            print(f"child pid={pid}", flush=True)
        pid, _ = os.wait()
        running.discard(pid)


if __name__ == "__main__":
    main()
