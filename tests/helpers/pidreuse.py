"""Force pid reuse: start a process that gets a given pid, through /proc/sys/kernel/ns_last_pid.

The kernel hands out ns_last_pid + 1 to the next fork in the pid namespace. Others fork too on a
shared host, so the attempt is repeated until the new process has the pid (or it gives up).
"""

from __future__ import annotations

import sys

from .workloads import Workload

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"

# Three threads that only sleep, and fork nothing: a hog runs ldconfig (ctypes) at start, and
# that child, a zombie nobody reaps on some hosts, keeps the hog's pid taken as its session id.
SLEEPER_ARGV = [
    sys.executable, "-c",
    "import threading, time\n"
    "for _ in range(2): threading.Thread(target=time.sleep, args=(120,), daemon=True).start()\n"
    "print('ready', flush=True); time.sleep(120)",
]

# A stranger that sets itself a nice of 5, so any change made to it shows.
STRANGER_ARGV = [sys.executable, "-c", "import os, time; os.nice(5); print('ready', flush=True); time.sleep(120)"]


def take_pid(pid: int, spawn, attempts: int = 50) -> Workload:
    """A new process (from `spawn`, so it is killed at teardown) whose pid is `pid`, now free."""
    got = []
    for _ in range(attempts):
        with open(NS_LAST_PID, "w") as handle:
            handle.write(str(pid - 1))
        stranger = spawn(STRANGER_ARGV)
        if stranger.pid == pid:
            return stranger
        got.append(stranger.pid)
        stranger.kill()
    raise RuntimeError(f"could not get pid {pid} back after {attempts} attempts (got {got[:5]}...)")
