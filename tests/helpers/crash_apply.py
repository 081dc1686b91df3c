"""Apply nice and affinity to a process through the Executor, then wait to be killed (or die mid-change).

Run by the crash-safety tests as a separate process, so SIGKILL hits a real remediator:

  python crash_apply.py --journal J --pid N --nice 10 --cpus 1
      applies both, prints "ready applied ...", then sleeps until killed
  python crash_apply.py --journal J --pid N --nice 10 --die-after-setpriority 1
      SIGKILLs itself right after the first setpriority: the journal holds an intent with no outcome
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from remediator.actuators import Syscalls, default_actuators
from remediator.cpulist import parse_cpulist
from remediator.executor import Executor
from remediator.model import ActionRequest
from remediator.journal import Journal
from remediator.procfs import ProcFS


class DyingSyscalls(Syscalls):
    """Real syscalls; after `limit` setpriority calls, the process kills itself (a crash mid-change)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def setpriority(self, tid: int, value: int) -> None:
        super().setpriority(tid, value)
        self.count += 1
        if self.count == self.limit:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--journal", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--nice", type=int)
    parser.add_argument("--cpus")
    parser.add_argument("--die-after-setpriority", type=int, default=0)
    args = parser.parse_args()

    procfs = ProcFS()
    syscalls = DyingSyscalls(args.die_after_setpriority) if args.die_after_setpriority else Syscalls()
    executor = Executor(Journal(args.journal), procfs, dry_run=False, actuators=default_actuators(procfs, syscalls=syscalls))
    identity = procfs.identity(args.pid)
    results = []
    if args.nice is not None:
        results.append(executor.apply(ActionRequest(identity, "nice", "crash-test", 0, {"nice": args.nice}), ()))
    if args.cpus:
        request = ActionRequest(identity, "affinity", "crash-test", 0, {"cpus": sorted(parse_cpulist(args.cpus))})
        results.append(executor.apply(request, ()))
    statuses = ",".join(outcome.status for outcome in results)
    print(f"ready applied {statuses}", flush=True)
    if any(outcome.status != "applied" for outcome in results):
        for outcome in results:
            print(outcome, file=sys.stderr)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
