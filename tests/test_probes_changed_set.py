"""The changed-set read of proc_cpu (issue 14: read only what ran) against a full read of the map.

Each CPU queues the entries that changed in an epoch once their unreported time reaches the report
floor (and always at a thread's last run). Processes keep running between the two reads, so
equality is asked only where it must hold: an entry that differs between the changed-set result and
a later full read must have been queued again since, in the epoch now open, or (with a floor) hold
less than the floor of time not yet read.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from remediator.probes import ProbeSettings, SchedProbes

from helpers.workloads import hog_argv, victim_argv

pytestmark = pytest.mark.bpf


def open_epoch_marks(probes: SchedProbes) -> set[tuple[int, int]]:
    """The keys the CPUs have queued in the epoch now open (read next time)."""
    _cpus, queued = probes._read_cpus(probes._epoch)
    assert queued is not None, "a queue overflowed"
    return {struct.unpack("<II", key) for key in queued}


def compare_with_full_reads(probes: SchedProbes, rounds: int, allowed_lag_ns: int) -> tuple[int, int]:
    """(entries compared, reads that were incremental)."""
    probes.snapshot()  # the first read is a full one
    compared = incremental_reads = 0
    for _ in range(rounds):
        time.sleep(0.1)
        before = probes._full_read_at
        result = dict(probes.snapshot().proc_cpu)
        incremental_reads += probes._full_read_at == before
        full = probes._read_proc_cpu()
        marked = open_epoch_marks(probes)  # after the full read: covers every change queued since the snapshot
        for key, entry in full.items():
            if key in marked:
                continue
            seen = result.get(key)
            if allowed_lag_ns == 0:
                # The same but for windows: an entry read incrementally holds only those from
                # the read before on, a full read all the ring holds.
                assert seen is not None and seen._replace(windows=()) == entry._replace(windows=()), f"{key}: {seen} != {entry}"
                assert entry.windows[len(entry.windows) - len(seen.windows):] == seen.windows, f"{key}: {seen} != {entry}"
            else:
                total, blame = (seen.total_ns, seen.blame_ns) if seen else (0, 0)
                late = (entry.total_ns - total) + (entry.blame_ns - blame)
                assert 0 <= late < allowed_lag_ns, f"{key}: {late} ns not read ({seen} against {entry})"
            compared += 1
        assert set(result) <= set(full) | marked
    return compared, incremental_reads


def test_with_no_floor_the_changed_set_read_returns_what_a_full_read_would(spawn):
    spawn(victim_argv(0))
    spawn(hog_argv("fluent-bit", 2, "--burst-ms", "150", "--period-ms", "400"))
    probes = SchedProbes(ProbeSettings(report_floor_ns=0))
    try:
        compared, incremental = compare_with_full_reads(probes, 12, allowed_lag_ns=0)
        assert incremental >= 11
        assert compared > 20  # most entries did not change between the two reads
    finally:
        probes.close()


def test_below_the_floor_an_entry_is_late_by_less_than_the_floor(spawn):
    spawn(victim_argv(0))
    spawn(hog_argv("fluent-bit", 2, "--burst-ms", "150", "--period-ms", "400"))
    floor = ProbeSettings().report_floor_ns
    probes = SchedProbes()
    try:
        compared, incremental = compare_with_full_reads(probes, 12, allowed_lag_ns=floor)
        assert incremental >= 11
        assert compared > 20
    finally:
        probes.close()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_until_idle(pids: list[int], timeout: float = 10.0) -> None:
    """Until none of `pids` has used CPU for 200 ms: they are past their start-up."""
    deadline = time.monotonic() + timeout
    before = {pid: _cpu_ticks(pid) for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = {pid: _cpu_ticks(pid) for pid in pids}
        if now == before:
            return
        before = now
    raise AssertionError(f"premise: {pids} did not go quiet within {timeout} s")


def quiet_argv(name: str) -> list[str]:
    """A process that runs its start-up (well past the floor) and then sleeps for an hour."""
    return hog_argv(name, 1, "--burst-ms", "1", "--period-ms", "3600000")


def test_a_quiet_process_costs_no_read(spawn):
    """Entries of processes that did not run, or ran less than the floor, are not queued: a process
    that ran once and now sleeps has entries in the map but none in the next reads, whatever the
    CPU count. (Its own processes: on a quiet host the map may hold almost nothing else.)"""
    probes = SchedProbes()
    try:
        quiet = [spawn(quiet_argv(f"quiet-{index}")).pid for index in range(6)]
        _wait_until_idle(quiet)
        probes.snapshot()  # reads what their start-up queued
        for _ in range(3):
            time.sleep(0.1)
            changed = probes.snapshot().proc_cpu_changed
            full = probes._read_proc_cpu()
            held = {key for key in full if key[0] in quiet}
            assert {pid for pid, _cpu in held} == set(quiet), "premise: their start-up is in the map"
            assert not held & set(changed), f"quiet processes read again: {sorted(held & set(changed))}"
    finally:
        probes.close()


def _spin(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run on")
def test_a_process_that_exits_below_the_floor_is_read_in_full():
    """A short-lived child (a shipper's gzip) that used less than the floor on one CPU and then
    ended on another: its last run queues that CPU's entry, and its exit the first one's, so all
    the time it used is read at once, not left for the next full read."""
    first, last = sorted(os.sched_getaffinity(0))[:2]
    floor_ns = ProbeSettings().report_floor_ns
    probes = SchedProbes()
    shown = 0
    try:
        for _ in range(24):  # until two scenes: on a loaded host the fork's own cost often spoils one
            if shown >= 2:
                break
            probes.snapshot()
            pid = os.fork()
            if pid == 0:  # the child: a little on `first`, then the end on `last`
                try:
                    for cpu in (last, first, last):
                        os.sched_setaffinity(0, {cpu})
                        _spin(floor_ns / 1e9 * 0.2)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.05)
            seen = probes.snapshot().proc_cpu
            full = probes._read_proc_cpu()
            if (pid, first) not in full or full[(pid, first)].total_ns >= floor_ns:
                continue  # the fork's own cost landed on `first`: not the scene
            for key in [(pid, first), (pid, last)]:
                assert seen.get(key) == full[key], f"{key}: {seen.get(key)} != {full[key]}"
            shown += 1
        assert shown >= 2, "premise: a child below the floor on a CPU other than its last"
    finally:
        probes.close()


def test_a_queue_that_overflows_makes_the_read_a_full_one(spawn):
    # Three busy processes kept to one CPU: it runs all three in any 100 ms (a process is one key
    # per CPU), more than its queue of two, whatever else the host runs or how many CPUs it has.
    cpu = min(os.sched_getaffinity(0))
    for index in range(3):
        busy = spawn(hog_argv(f"busy-{index}", 1))
        for tid in busy.tids():
            os.sched_setaffinity(tid, {cpu})
    probes = SchedProbes(ProbeSettings(report_floor_ns=0, changed_queue_slots=2))
    try:
        probes.snapshot()
        for _ in range(5):
            time.sleep(0.1)
            before = probes._full_read_at
            result = dict(probes.snapshot().proc_cpu)
            if probes._full_read_at != before:
                break
        assert probes.changed_overflows > 0
        assert probes._full_read_at != before
        full = probes._read_proc_cpu()
        marked = open_epoch_marks(probes) if probes._read_cpus(probes._epoch)[1] is not None else set(full)
        assert all(result.get(key) == entry for key, entry in full.items() if key not in marked)
    finally:
        probes.close()
