"""A latency-sensitive victim: sleep ~1 ms, work ~100 us, repeat, pinned to one CPU.

  python3 victim.py --cpu 0
  python3 victim.py --cpu 0 --worker-after 2     the working thread is created 2 s after start
  python3 victim.py --cpu 0 --child-hog gzip     it first forks a CPU hog named gzip, a worker of
                                                 its own ("ready ... child=<pid>")
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import announce_ready, set_thread_name  # noqa: E402


def work_loop(sleep_s: float, work_ns: int) -> None:
    while True:
        time.sleep(sleep_s)
        end = time.perf_counter_ns() + work_ns
        while time.perf_counter_ns() < end:
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--comm", default="victim")
    parser.add_argument("--sleep-us", type=float, default=1000.0)
    parser.add_argument("--work-us", type=float, default=100.0)
    parser.add_argument("--worker-after", type=float, default=0.0, help="start the working thread this late")
    parser.add_argument("--child-hog", metavar="COMM", help="first fork a CPU hog (hog.py) named COMM")
    parser.add_argument("--child-threads", type=int, default=2)
    args = parser.parse_args()
    child = {}
    if args.child_hog:
        # Before pinning: the child gets every CPU, as an unrelated hog would. It ends with the
        # process group the test kills.
        hog = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hog.py"),
                                "--comm", args.child_hog, "--threads", str(args.child_threads)], stdout=subprocess.PIPE, text=True)
        if not hog.stdout.readline().startswith("ready"):
            sys.exit(f"the child hog did not start (exit {hog.poll()})")
        child = {"child": hog.pid}
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    set_thread_name(args.comm)
    loop_args = (args.sleep_us / 1e6, int(args.work_us * 1000))
    if not args.worker_after:
        announce_ready(cpu=args.cpu, **child)
        work_loop(*loop_args)
    announce_ready(cpu=args.cpu, worker_after=args.worker_after, **child)
    time.sleep(args.worker_after)
    worker = threading.Thread(target=work_loop, args=loop_args, daemon=True)
    worker.start()
    print(f"worker tid={worker.native_id}", flush=True)
    worker.join()


if __name__ == "__main__":
    main()
