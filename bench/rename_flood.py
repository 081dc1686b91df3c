"""The daemon's cost when a local user renames processes in a loop (task events).

A rename costs a process one system call; with task events (task:task_rename) the kernel tells
the daemon of each renamed process once per tick, and the daemon judges it again (its selectors,
and the burst watch's policies): at most CHANGED_PER_TICK_MAX a tick and each process at most every
CHANGED_AGAIN_AFTER_S (remediator/collector.py), the rest waiting their turn. This bench runs the
daemon as shipped (`remediator run`, dry-run, shipped policies, the service named by comm) on a
small synthetic host (bench/scale.py's SmallHost: 100 processes, a 50-thread service) and
measures its CPU with no renamer, with a few processes renaming themselves every 10 ms, and with
many renaming themselves as fast as they can (past the per-tick budget). With --old-ref REF, that
ref's daemon runs beside this tree's at the same time, on the same host and its noise (a ref
before task events pays nothing for renames: the bound on what they cost).

  sudo .venv/bin/python bench/rename_flood.py --old-ref 359e62f
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--few", type=int, default=6, help="processes renaming themselves every 10 ms")
    parser.add_argument("--many", type=int, default=200, help="processes renaming themselves as fast as they can")
    scale.side_by_side_arguments(parser, seconds=30.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("rename_flood: run as root (the probes)", file=sys.stderr)
        return 1
    phases = (("no renamer", None), (f"{args.few} processes renaming every 10 ms", (args.few, 10_000)),
              (f"{args.many} processes renaming as fast as they can", (args.many, 0)))
    with scale.small_host_side_by_side("bench/rename_flood.py", args.old_ref, args.warmup, args.seconds,
                                       "rename_loop.c") as (daemons, loop_binary):
        for phase, loop in phases:
            renamers = None
            try:
                if loop is not None:
                    renamers = subprocess.Popen([str(loop_binary), str(loop[0]), str(loop[1])], stdout=subprocess.PIPE,
                                                text=True, start_new_session=True)
                    if renamers.stdout.readline().strip() != "ready":
                        raise SystemExit("rename_flood: the renamers did not start")
                    time.sleep(5)
                print(scale.daemons_cpu_line(daemons, args.seconds, phase, args.old_ref), flush=True)
            finally:
                if renamers is not None:
                    os.killpg(renamers.pid, 9)
                    renamers.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
