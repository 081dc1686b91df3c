"""Hand-written /proc reads against psutil's for the reads the daemon makes every tick, side by side.

For each live process (or its threads): the identity read (the stat file for start time and comm,
against psutil.Process(pid), which reads stat for create_time, plus name()), the thread list (listdir
of task/, against psutil's threads(), which reads every thread's stat), and process_info (what a
cache miss costs; psutil-based here, for scale). Interleaved rounds, medians per process.

    flock /tmp/remediator-cpu.lock .venv/bin/python bench/procfs_reads.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil

from remediator.errors import RemediatorError
from remediator.procfs import ProcFS


def timed(pids: list[int], read) -> float:
    start = time.perf_counter()
    for pid in pids:
        try:
            read(pid)
        except (RemediatorError, psutil.Error):
            pass
    return (time.perf_counter() - start) / len(pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    procfs = ProcFS()
    pids = procfs.pids()

    def psutil_identity(pid: int):
        process = psutil.Process(pid)
        return process.create_time(), process.name()

    pairs = {
        "identity (stat)": (lambda pid: procfs.stat(pid), psutil_identity),
        "thread list": (procfs.tids, lambda pid: psutil.Process(pid).threads()),
    }
    results = {name: ([], []) for name in pairs}
    info = []
    for _ in range(args.rounds):
        for name, (hand, library) in pairs.items():
            results[name][0].append(timed(pids, hand))
            results[name][1].append(timed(pids, library))
        info.append(timed(pids, procfs.process_info))
    print(f"{len(pids)} processes, {args.rounds} rounds, medians per process")
    print(f"{'':20}{'hand (us)':>11}{'psutil (us)':>13}{'ratio':>8}")
    for name, (hand, library) in results.items():
        low, high = statistics.median(hand), statistics.median(library)
        print(f"{name:20}{low * 1e6:11.1f}{high * 1e6:13.1f}{high / low:8.2f}")
    print(f"{'process_info':20}{'':11}{statistics.median(info) * 1e6:13.1f}")


if __name__ == "__main__":
    main()
