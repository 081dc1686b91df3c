"""The daemon's cost on a host that execs: a build, or a script that runs commands, beside the service.

Each exec'd process is judged within a tick (a policy may govern it: the burst watch makes it a
candidate, an `always` policy places it at exec), which reads who it is from /proc: its stat,
cgroup, uids, exe, cmdline and its ancestors. This bench runs the daemon as shipped (`remediator
run`, dry-run, shipped policies, the service named by comm) on a small synthetic host
(bench/scale.py's SmallHost: 100 processes, a 50-thread service) and measures its CPU first with no exec
loop, then with bench/exec_loop.c forking and exec'ing `sleep LIFETIME` RATE times a second.
With --old-ref REF, that ref's daemon runs beside this tree's at the same time, on the same host
and its noise, and the ratio is printed.

  sudo .venv/bin/python bench/exec_churn.py --old-ref 2d2c4e1
  sudo .venv/bin/python bench/exec_churn.py --rate 100 --lifetime 0.2
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
    parser.add_argument("--rate", type=int, default=50, help="execs per second")
    parser.add_argument("--lifetime", default="0.5", help="seconds each exec'd process lives (sleep's argument)")
    scale.side_by_side_arguments(parser, seconds=40.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("exec_churn: run as root (the probes)", file=sys.stderr)
        return 1
    with scale.small_host_side_by_side("bench/exec_churn.py", args.old_ref, args.warmup, args.seconds,
                                       "exec_loop.c") as (daemons, loop_binary):
        loop = None
        try:
            for phase in ("no exec loop", f"{args.rate} execs/s of sleep {args.lifetime}"):
                if phase != "no exec loop":
                    loop = subprocess.Popen([str(loop_binary), str(args.rate), args.lifetime])
                    time.sleep(5)
                print(scale.daemons_cpu_line(daemons, args.seconds, phase, args.old_ref), flush=True)
        finally:
            if loop is not None:
                loop.kill()
                loop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
