"""Many short runs: two threads of one process (or a process and its child, --fork) bounce a byte over pipes ROUNDS times (each run a
few microseconds), then the process sleeps PAUSE ms. Little CPU in all, but hundreds of context
switches per burst on its CPU.

  python3 chatter.py --comm chatter --rounds 100 --pause-ms 5
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", default="chatter")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--fork", action="store_true", help="the echo side is a child process, not a thread")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (before forking: the child too)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    set_thread_name(args.comm)
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()

    def echo() -> None:
        set_thread_name(args.comm)
        while True:
            os.write(pong_w, os.read(ping_r, 1))

    if args.fork:
        if os.fork() == 0:
            echo()
    else:
        threading.Thread(target=echo, daemon=True).start()
    announce_ready()
    while True:
        for _ in range(args.rounds):
            os.write(ping_w, b"x")
            os.read(pong_r, 1)
        time.sleep(args.pause_ms / 1e3)


if __name__ == "__main__":
    main()
