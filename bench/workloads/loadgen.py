"""Open-loop load: Poisson arrivals at a fixed mean rate, each request timed from when it was due.

Requests are sent on schedule whether or not earlier ones were answered, and a request's latency is
measured from its scheduled send time, so a stalled server shows its full delay (no coordinated
omission). Writes one line per request: "<scheduled unix time> <latency ms>".

    python3 loadgen.py --port P --rate 600 --duration 60 --seed 1 --out lat.txt --cpu 0
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=600.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start sending at")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    set_thread_name("api-client")
    rng = random.Random(args.seed)
    offsets = []
    t = 0.0
    while t < args.duration:
        t += rng.expovariate(args.rate)
        offsets.append(t)
    connection = socket.create_connection(("127.0.0.1", args.port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(connection, selectors.EVENT_READ)
    announce_ready(requests=len(offsets))
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    wall0, mono0 = time.time(), time.monotonic()
    due = [mono0 + offset for offset in offsets]
    latencies = [0.0] * len(due)
    sent = answered = 0
    pending = b""
    while answered < len(due):
        now = time.monotonic()
        batch = []
        while sent < len(due) and due[sent] <= now:
            batch.append(b"%d\n" % sent)
            sent += 1
        if batch:
            connection.sendall(b"".join(batch))
        timeout = max(0.0, due[sent] - time.monotonic()) if sent < len(due) else 1.0
        for _key, _ in selector.select(timeout):
            data = connection.recv(65536)
            if not data:
                raise SystemExit("server closed the connection")
            received = time.monotonic()
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                seq = int(line)
                latencies[seq] = (received - due[seq]) * 1000.0
                answered += 1
    with open(args.out, "w") as out:
        for offset, latency in zip(offsets, latencies):
            out.write(f"{wall0 + offset:.6f} {latency:.4f}\n")


if __name__ == "__main__":
    main()
