"""Moves a process's threads to another CPU and back, as the load balancer would: every PERIOD ms
pin them to --to for AWAY ms, then back to --home. A thread waiting on --home's run queue when it
is pinned away is moved while it waits, and is switched in on --to: a migrated wait.

With --busy-ms it is also a duty-cycle load on its own CPU: busy BUSY ms, then IDLE ms of moving
(so whoever it moves finds its CPU idle, and it delays no one it moved).

  python3 mover.py --pid 1234 --home 0 --to 1 --period-ms 2 --away-ms 0.3
  python3 mover.py --pid 1234 --busy-ms 10 --idle-ms 10 --comm innocent     a 50%-duty mover
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def pin_all(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--home", type=int, default=0)
    parser.add_argument("--to", type=int, default=1)
    parser.add_argument("--period-ms", type=float, default=2.0)
    parser.add_argument("--away-ms", type=float, default=0.3)
    parser.add_argument("--busy-ms", type=float, default=0.0)
    parser.add_argument("--idle-ms", type=float, default=10.0)
    parser.add_argument("--comm", default="mover")
    args = parser.parse_args()
    set_thread_name(args.comm)
    announce_ready()
    while True:
        if args.busy_ms:
            end = time.perf_counter_ns() + int(args.busy_ms * 1e6)
            while time.perf_counter_ns() < end:
                pass
        idle_end = time.monotonic() + (args.idle_ms / 1e3 if args.busy_ms else 1.0)
        while time.monotonic() < idle_end:
            pin_all(args.pid, {args.to})
            time.sleep(args.away_ms / 1e3)
            pin_all(args.pid, {args.home})
            time.sleep(args.period_ms / 1e3)


if __name__ == "__main__":
    main()
