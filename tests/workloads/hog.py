"""A CPU hog that looks like a sidecar: N threads compressing with zlib (which releases the GIL,
so the threads really run in parallel), named like a log shipper.

  python3 hog.py --comm fluent-bit --threads 2                 flat out
  python3 hog.py --comm fluent-bit --burst-ms 300 --period-ms 3000   bursts
  python3 hog.py --comm fluent-bit --extra-thread-after 2      one more thread later
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import announce_ready, set_thread_name  # noqa: E402


def log_like_data(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [b"GET", b"POST", b"/api/v1/items", b"200", b"404", b"latency_ms", b"user=", b"trace_id="]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(8)) + b" %d\n" % rng.randrange(1 << 30)
    return bytes(out[:size])


def compress_until(deadline: float, data: bytes) -> None:
    while time.monotonic() < deadline:
        zlib.compress(data, 6)


def worker(args: argparse.Namespace, index: int, reset: bool = False) -> None:
    set_thread_name(args.comm)
    if reset:
        # Like a runtime that sets up its own threads: undo what the thread inherited.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    data = log_like_data(256 * 1024, index)
    if not args.burst_ms:
        compress_until(float("inf"), data)
    period = args.period_ms / 1000.0
    burst = args.burst_ms / 1000.0
    start = args.epoch if args.epoch else time.monotonic()
    while True:
        # Bursts start on multiples of the period from a shared epoch, so all threads burst together.
        now = time.monotonic()
        elapsed = (now - start) % period
        if elapsed < burst:
            compress_until(now + (burst - elapsed), data)
        else:
            time.sleep(period - elapsed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", default="fluent-bit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--burst-ms", type=float, default=0.0, help="0 = always busy")
    parser.add_argument("--period-ms", type=float, default=3000.0)
    parser.add_argument("--epoch", type=float, default=0.0, help="time.monotonic() the burst schedule starts at")
    parser.add_argument("--extra-thread-after", type=float, default=0.0)
    parser.add_argument("--extra-thread-on-signal", action="store_true",
                        help="start the extra thread when SIGUSR1 arrives (a test's own moment), not after a delay")
    parser.add_argument("--extra-thread-resets", action="store_true",
                        help="the extra thread resets its own nice to 0 and affinity to all CPUs as it starts")
    args = parser.parse_args()
    if args.extra_thread_on_signal:
        # Blocked in every thread before any starts (SIGUSR1 would kill the one it reached), and
        # before ready: a signal sent early waits for sigwait.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    set_thread_name(args.comm)
    threads = [threading.Thread(target=worker, args=(args, i), daemon=True) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    announce_ready(threads=args.threads)
    if args.extra_thread_on_signal or args.extra_thread_after:
        if args.extra_thread_on_signal:
            signal.sigwait({signal.SIGUSR1})
        else:
            time.sleep(args.extra_thread_after)
        extra = threading.Thread(target=worker, args=(args, len(threads), args.extra_thread_resets), daemon=True)
        extra.start()
        print(f"extra-thread tid={extra.native_id}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
