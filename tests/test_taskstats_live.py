"""taskstats over netlink on real threads (root): the same counters as schedstat, and the exit
record that carries the last wait of a thread ending between two reads, which schedstat loses."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from remediator.procfs import ProcFS
from remediator.sources import ProcfsSource
from remediator.taskstats import SchedstatCounters, TaskstatsCounters

pytestmark = pytest.mark.root

PROCFS = ProcFS()

# A main thread and a worker pinned to one CPU, both hashing for 0.3 s, so the worker waits about
# half of that; then the worker ends and the main thread sleeps. Light: 0.3 s of one CPU. hashlib
# lets go of the GIL over a large buffer, so the two really compete for the CPU (a pure-Python spin
# takes turns on the GIL instead, and which thread waits on the run queue is then up to chance).
SCRIPT = r"""
import hashlib, os, sys, threading, time
os.sched_setaffinity(0, {0})
go = threading.Event()
BLOCK = bytes(1 << 20)
def spin():
    go.wait()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        hashlib.sha256(BLOCK).digest()
worker = threading.Thread(target=spin)
worker.start()
print("ready", worker.native_id, flush=True)
sys.stdin.readline()
go.set()
spin()
worker.join()
print("done", flush=True)
time.sleep(60)
"""


def test_taskstats_reads_the_counters_schedstat_prints(spawn):
    counters = TaskstatsCounters(PROCFS)
    try:
        worker = spawn([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE)
        # "ready" is printed before the main thread blocks on stdin: wait until every thread sleeps.
        deadline = time.monotonic() + 10
        while any(PROCFS.stat(worker.pid, tid).state != "S" for tid in PROCFS.tids(worker.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        for tid in PROCFS.tids(worker.pid):
            run, wait, slices = counters.request(worker.pid, tid)
            assert (run, wait, slices) == PROCFS.schedstat(worker.pid, tid)  # both idle: nothing moves between reads
    finally:
        counters.close()


def test_the_exit_record_keeps_the_wait_schedstat_loses(spawn):
    with_exits = ProcfsSource(PROCFS, counters=TaskstatsCounters(PROCFS))
    polling = ProcfsSource(PROCFS, counters=SchedstatCounters(PROCFS))
    try:
        workload = spawn([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE)
        tids = set(PROCFS.tids(workload.pid))
        for source in (with_exits, polling):
            source.read({workload.pid: tids})
        workload.proc.stdin.write("\n")
        workload.proc.stdin.flush()
        assert workload.read_line() == "done"
        # join() returns before the kernel has reaped the thread: wait until it has left task/.
        deadline = time.monotonic() + 10
        while len(alive := set(PROCFS.tids(workload.pid))) == len(tids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(alive) < len(tids), "the worker should have ended"
        counted = with_exits.read({workload.pid: alive}).wait_ns
        polled = polling.read({workload.pid: alive}).wait_ns
    finally:
        with_exits.close()
        polling.close()
    print(f"taskstats {counted / 1e6:.1f} ms, schedstat {polled / 1e6:.1f} ms, overflows {with_exits.counters.dropped}")
    # The two hashing threads shared one CPU for 0.3 s: each waited for about half of it (150 ms
    # each, 6 runs here), and only the exit record still has the worker's.
    assert counted - polled > 10e6
