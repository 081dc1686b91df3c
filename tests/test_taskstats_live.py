"""taskstats over netlink on real threads (root): the same counters as schedstat, and the exit
record that carries the last wait of a thread ending between two reads, which schedstat loses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def measure_exit_record() -> tuple[int, int, int]:
    """(wait counted with exit records, wait polled from schedstat, exit-record overflows) of the
    workload's two threads, the worker having ended between the two reads."""
    with_exits = ProcfsSource(PROCFS, counters=TaskstatsCounters(PROCFS))
    polling = ProcfsSource(PROCFS, counters=SchedstatCounters(PROCFS))
    workload = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert workload.stdout.readline().startswith("ready")
        tids = set(PROCFS.tids(workload.pid))
        for source in (with_exits, polling):
            source.read({workload.pid: tids})
        workload.stdin.write("\n")
        workload.stdin.flush()
        assert workload.stdout.readline().strip() == "done"
        # join() returns before the kernel has reaped the thread: wait until it has left task/.
        deadline = time.monotonic() + 10
        while len(alive := set(PROCFS.tids(workload.pid))) == len(tids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(alive) < len(tids), "the worker should have ended"
        counted = with_exits.read({workload.pid: alive}).wait_ns
        polled = polling.read({workload.pid: alive}).wait_ns
        return counted, polled, with_exits.counters.dropped
    finally:
        workload.kill()
        workload.wait()
        with_exits.close()
        polling.close()


def test_the_exit_record_keeps_the_wait_schedstat_loses():
    # In a fresh interpreter, as the daemon opens its one source: inside the suite's process the
    # worker's exit record went missing in 2 of 3 full-suite runs on 2026-12-06 (never with this
    # file alone or after its neighbours, 12 of 12); the cause is not found yet.
    runner = subprocess.Popen(
        [sys.executable, "-c", "import test_taskstats_live as t; print(*t.measure_exit_record())"],
        cwd=Path(__file__).parent, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)  # and the workload it started
            runner.wait()
    assert runner.returncode == 0, err
    counted, polled, dropped = map(int, out.split())
    print(f"taskstats {counted / 1e6:.1f} ms, schedstat {polled / 1e6:.1f} ms, overflows {dropped}")
    # The two hashing threads shared one CPU for 0.3 s: each waited for about half of it (150 ms
    # each, 6 runs here), and only the exit record still has the worker's.
    assert counted - polled > 10e6
