"""The protected service: a TCP server on loopback doing ~0.5 ms of CPU work per request.

One connection, requests are lines "<seq>\\n", each answered "<seq>\\n" after the work, in order:
when the server falls behind, requests queue, as they would in a real service that lost its CPU.

    python3 server.py --port 0 --cpu 0 --work-us 500      prints "ready pid=N port=P"
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def work(duration_ns: int) -> None:
    end = time.perf_counter_ns() + duration_ns
    x = 0
    while time.perf_counter_ns() < end:
        x += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--work-us", type=float, default=500.0)
    parser.add_argument("--comm", default="api-server")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    set_thread_name(args.comm)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1)
    announce_ready(port=listener.getsockname()[1])
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    work_ns = int(args.work_us * 1000)
    pending = b""
    while True:
        data = connection.recv(65536)
        if not data:
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        replies = []
        for line in lines:
            work(work_ns)
            replies.append(line + b"\n")
        if replies:
            connection.sendall(b"".join(replies))


if __name__ == "__main__":
    main()
