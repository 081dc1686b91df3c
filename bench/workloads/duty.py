"""A process busy a fixed share of the time: busy BUSY ms, then asleep IDLE ms, repeat.

  python3 duty.py --comm innocent --busy-ms 10 --idle-ms 10      50% duty
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "workloads"))
from common import announce_ready, set_thread_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comm", default="innocent")
    parser.add_argument("--busy-ms", type=float, default=10.0)
    parser.add_argument("--idle-ms", type=float, default=10.0)
    args = parser.parse_args()
    set_thread_name(args.comm)
    announce_ready()
    busy_ns, idle_s = int(args.busy_ms * 1e6), args.idle_ms / 1e3
    while True:
        end = time.perf_counter_ns() + busy_ns
        while time.perf_counter_ns() < end:
            pass
        time.sleep(idle_s)


if __name__ == "__main__":
    main()
