"""A log-shipper-like sidecar: idle, then compressing flat out on several threads for a few hundred
milliseconds every few seconds. Burst onsets are written to a file as "<unix time> <pid>".

    python3 sidecar.py --comm fluent-bit --threads 2 --burst-ms 400 --period-ms 3000 --bursts-out b.txt
    python3 sidecar.py ... --fork-per-burst     each burst in a new child process (new identity)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402
from hog import log_like_data  # noqa: E402


def burst(data: list[bytes], seconds: float, comm: str) -> None:
    deadline = time.monotonic() + seconds
    threads = len(data)

    def compress(index: int) -> None:
        set_thread_name(comm)
        while time.monotonic() < deadline:
            zlib.compress(data[index], 6)

    workers = [threading.Thread(target=compress, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def cpu_cgroup() -> str:
    """This process's CPU cgroup (v1 cpu hierarchy, else the v2 path): a child forked after its
    parent was moved into remediator's group is born there, and the bench must tell that burst
    (prevented by an earlier step) from one detection missed."""
    paths = {}
    with open("/proc/self/cgroup") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            paths[controllers] = path
    for controllers, path in paths.items():
        if "cpu" in controllers.split(","):
            return path
    return paths.get("", "?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", default="fluent-bit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--burst-ms", type=float, default=400.0)
    parser.add_argument("--period-ms", type=float, default=3000.0)
    parser.add_argument("--first-after-ms", type=float, default=2000.0)
    parser.add_argument("--bursts-out", required=True)
    parser.add_argument("--fork-per-burst", action="store_true")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() the schedule starts at")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each onset later by a uniform random amount up to this (seeded: same schedule every run)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    set_thread_name(args.comm)
    announce_ready(threads=args.threads)
    start = args.start_at or time.time()
    out = open(args.bursts_out, "a", buffering=1)
    jitter = random.Random(args.seed)
    # What there is to compress exists before the burst, as a shipper's buffered lines do, so the
    # onset written is the instant the compressing threads start (making it took 25 ms of one
    # thread, which the onset used to include).
    data = [log_like_data(256 * 1024, i) for i in range(args.threads)]
    index = 0
    while True:
        onset = start + args.first_after_ms / 1000 + index * args.period_ms / 1000 + jitter.uniform(0, args.jitter_ms) / 1000
        time.sleep(max(0.0, onset - time.time()))
        if args.fork_per_burst:
            child = os.fork()
            if child == 0:
                out.write(f"{time.time():.6f} {os.getpid()} {cpu_cgroup().replace(' ', '_')}\n")
                burst(data, args.burst_ms / 1000, args.comm)
                # Idle until just before the next burst (like a worker kept for a while), so an
                # action that comes after the burst still finds its process.
                time.sleep(max(0.0, onset + (args.period_ms - 100) / 1000 - time.time()))
                os._exit(0)
            os.waitpid(child, 0)
        else:
            out.write(f"{time.time():.6f} {os.getpid()}\n")
            burst(data, args.burst_ms / 1000, args.comm)
        index += 1


if __name__ == "__main__":
    main()
