"""The daemon's cost when a local user renames processes in a loop (task events).

A rename costs a process one system call; with task events (task:task_rename) the kernel tells
the daemon of each renamed process once per tick, and the daemon judges it again (its selectors,
and the burst watch's policies). Past CHANGED_PER_TICK_MAX renamed processes in a tick, none is
judged one by one and the next rescan judges every process instead. This bench runs the daemon as
shipped (`remediator run`, dry-run, shipped policies, the service named by comm) on a small
synthetic host (bench/scale_host.c: 100 processes, a 50-thread service) and measures its CPU with
no renamer, with a few processes renaming themselves every 10 ms (under the cap), and with many
renaming themselves as fast as they can (over it). With --old-ref REF, that ref's daemon runs
beside this tree's at the same time, on the same host and its noise (a ref before task events
pays nothing for renames: the bound on what they cost).

  sudo .venv/bin/python bench/rename_flood.py --old-ref 359e62f
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import old_ref  # noqa: E402
import scale  # noqa: E402

HERE = Path(__file__).resolve().parent


class HostShape:
    processes, wakeups, service_threads, service_wakeups = 100, 25, 50, 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--few", type=int, default=6, help="renaming processes under the cap (every 10 ms)")
    parser.add_argument("--many", type=int, default=200, help="renaming processes over the cap (as fast as they can)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured per phase")
    parser.add_argument("--warmup", type=float, default=25.0)
    parser.add_argument("--old-ref", default=None, help="also run that git ref's daemon beside this tree's")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("rename_flood: run as root (the probes)", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="remediator-rename-flood-"))
    loop_binary = directory / "rename_loop"
    subprocess.run(["gcc", "-O2", "-o", str(loop_binary), str(HERE / "rename_loop.c")], check=True)
    host, _services = scale.start_host(HostShape, directory)
    daemons: dict[str, subprocess.Popen] = {}
    renamers = None
    try:
        old_tree = None
        if args.old_ref:
            (directory / "old").mkdir()
            old_tree = old_ref.extract(args.old_ref, directory / "old")
        daemons = scale.start_shipped_daemons(directory, old_tree, args.old_ref, "bench/rename_flood.py")
        time.sleep(args.warmup)
        print(f"Host: {HostShape.processes} processes, a {HostShape.service_threads}-thread service named by comm; "
              f"the daemon as shipped (dry-run, shipped policies), {args.seconds:g} s per phase")
        phases = (("no renamer", None), (f"{args.few} processes renaming every 10 ms", (args.few, 10_000)),
                  (f"{args.many} processes renaming as fast as they can", (args.many, 0)))
        for phase, loop in phases:
            if loop is not None:
                renamers = subprocess.Popen([str(loop_binary), str(loop[0]), str(loop[1])], stdout=subprocess.PIPE,
                                            text=True, start_new_session=True)
                if renamers.stdout.readline().strip() != "ready":
                    raise SystemExit("rename_flood: the renamers did not start")
                time.sleep(5)
            print(scale.daemons_cpu_line(daemons, args.seconds, phase, args.old_ref), flush=True)
            if renamers is not None:
                os.killpg(renamers.pid, 9)
                renamers.wait()
                renamers = None
    finally:
        if renamers is not None:
            os.killpg(renamers.pid, 9)
            renamers.wait()
        scale.stop_daemons(daemons.values())
        os.killpg(host.pid, 9)
        host.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
