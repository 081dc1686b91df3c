"""What one tick of the no-BPF fallback costs, schedstat against taskstats, side by side in one run.

A process with --threads idle threads stands for the protected service. Each round reads every
thread's (run, wait, timeslices) once from schedstat and once by taskstats requests, interleaved,
so the machine's noise falls on both alike. Then the whole ProcfsSource.read (which also reads
every process's stat) with schedstat alone and with taskstats's exit records drained, while
--exits short-lived threads end before each tick (the exit records a busy host sends).
Medians over --rounds, and the ratio taskstats/schedstat.

    flock /tmp/remediator-cpu.lock .venv/bin/python bench/fallback_cost.py [--threads 64] [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

from remediator.procfs import ProcFS
from remediator.sources import ProcfsSource
from remediator.taskstats import SchedstatCounters, TaskstatsCounters

SERVICE = "import threading, sys\n[threading.Thread(target=sys.stdin.read, daemon=True).start() for _ in range({n})]\nprint('ready', flush=True)\nsys.stdin.read()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--exits", type=int, default=20, help="threads that end before each whole-tick read")
    args = parser.parse_args()
    service = subprocess.Popen([sys.executable, "-c", SERVICE.format(n=args.threads - 1)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        service.stdout.readline()
        procfs = ProcFS()
        tids = procfs.tids(service.pid)
        readers = {"schedstat": SchedstatCounters(procfs), "taskstats": TaskstatsCounters(procfs)}
        per_thread = {"schedstat": readers["schedstat"].read, "taskstats": readers["taskstats"].request}
        sources = {name: ProcfsSource(procfs, counters=reader) for name, reader in readers.items()}
        protected = {service.pid: set(tids)}
        reads: dict[str, list[float]] = {name: [] for name in readers}
        ticks: dict[str, list[float]] = {name: [] for name in readers}
        for source in sources.values():
            source.read(protected)
        for _ in range(args.rounds):
            for name, read in per_thread.items():
                start = time.perf_counter()
                for tid in tids:
                    read(service.pid, tid)
                reads[name].append(time.perf_counter() - start)
        for _ in range(max(5, args.rounds // 10)):
            for name, source in sources.items():
                ending = [threading.Thread(target=int) for _ in range(args.exits)]
                for thread in ending:
                    thread.start()
                for thread in ending:
                    thread.join()
                start = time.perf_counter()
                source.read(protected)
                ticks[name].append(time.perf_counter() - start)
        for source in sources.values():
            source.close()
    finally:
        service.kill()
        service.wait()
    print(f"{len(tids)} threads, {args.rounds} rounds, {args.exits} exits a tick, medians")
    print(f"{'':28}{'schedstat':>12}{'taskstats':>12}{'ratio':>8}")
    for label, series in (("thread reads per tick (ms)", reads), ("ProcfsSource.read (ms)", ticks)):
        low, high = statistics.median(series["schedstat"]), statistics.median(series["taskstats"])
        print(f"{label:28}{low * 1e3:12.3f}{high * 1e3:12.3f}{high / low:8.2f}")
    per = {name: statistics.median(series) / len(tids) * 1e6 for name, series in reads.items()}
    print(f"{'per thread (us)':28}{per['schedstat']:12.1f}{per['taskstats']:12.1f}{per['taskstats'] / per['schedstat']:8.2f}")


if __name__ == "__main__":
    main()
