"""Task events on real processes (a rename by prctl, a thread naming itself, an exec, a cgroup
move), and the kernel's count of protected threads added and removed that spares the collector's
per-tick thread counts.

Runs as root with BPF (CI); elsewhere it skips saying why, and .ci/run fails on such a skip.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from remediator.collector import Collector
from remediator.procfs import ProcFS
from remediator.probes import SchedProbes
from remediator.selectors import ProtectSelectors
from remediator.sources import BpfSource

from helpers.cgroups import move_to, scratch_cpuset  # noqa: F401 (fixture)
from helpers.workloads import WORKLOADS

pytestmark = pytest.mark.bpf

PROCFS = ProcFS()

def start_renamer(spawn):
    return spawn([sys.executable, str(WORKLOADS / "renamer.py")], stdin=subprocess.PIPE)  # spawn waits for "ready"


def command(workload, text: str) -> None:
    workload.proc.stdin.write(text + "\n")
    workload.proc.stdin.flush()
    assert workload.read_line() == "ok"


@pytest.fixture
def probes():
    loaded = SchedProbes()
    try:
        if not loaded.has_task_events:
            pytest.fail("this kernel has task:task_rename and cgroup:cgroup_attach_task (tracefs): they must load")
        yield loaded
    finally:
        loaded.close()


def changes(probes: SchedProbes) -> tuple[set[int], set[int]]:
    probes.snapshot()  # closes the epoch, as the collector's read does before it asks
    return probes.task_changes()


def test_a_process_renaming_itself_is_told_and_its_exec_and_its_threads_names_are_not(spawn, probes):
    changes(probes)
    renamer = start_renamer(spawn)  # exec'd: its exec renamed it, and the exec event stands for that
    pid = renamer.pid
    renamed, _moved = changes(probes)
    assert pid not in renamed
    assert pid in {event.pid for event in probes.exec_events()}
    command(renamer, "thread pool-worker-1")  # a thread naming itself (thread pools do): not the process's name
    renamed, _moved = changes(probes)
    assert pid not in renamed and PROCFS.stat(pid).comm.startswith("python")
    command(renamer, "name fluent-bit")
    renamed, _moved = changes(probes)
    assert pid in renamed and PROCFS.stat(pid).comm == "fluent-bit"
    # Renamed again in the same epoch after its event: one event per epoch, and the next epoch's rename is told.
    command(renamer, "name fluent-bit-2")
    command(renamer, "name fluent-bit-3")
    renamed, _moved = changes(probes)
    assert pid in renamed
    assert changes(probes) == (set(), set())
    command(renamer, "name fluent-bit-4")
    assert pid in changes(probes)[0]


def test_a_process_moved_to_another_cgroup_is_told_once_and_a_thread_moved_alone_by_its_tid(spawn, probes, scratch_cpuset):
    renamer = start_renamer(spawn)
    command(renamer, "thread parked")
    pid = renamer.pid
    tids = set(PROCFS.tids(pid))
    assert len(tids) == 2
    changes(probes)
    move_to(scratch_cpuset("0"), pid)  # cgroup.procs moves every thread: one event, for the main thread
    assert changes(probes)[1] == {pid}
    (thread,) = tids - {pid}
    (scratch_cpuset("1") / "tasks").write_text(str(thread))  # v1's tasks file moves one thread
    assert changes(probes)[1] == {thread}


def test_the_collector_names_the_process_a_moved_thread_belongs_to(spawn, scratch_cpuset):
    renamer = start_renamer(spawn)
    command(renamer, "thread parked")
    (thread,) = set(PROCFS.tids(renamer.pid)) - {renamer.pid}
    collector = Collector(BpfSource(PROCFS), ProtectSelectors.build(comms=["nothing-by-this-name"]), PROCFS, rescan_s=3600.0)
    try:
        collector.start()
        collector.sample()
        (scratch_cpuset("1") / "tasks").write_text(str(thread))
        collector.sample()
        assert collector.changed == {renamer.pid}
    finally:
        collector.close()


def test_the_collector_protects_a_process_renamed_into_a_selector_within_one_sample(spawn):
    renamer = start_renamer(spawn)
    pid = renamer.pid
    # No rescan in this test: only the task event can bring the process in.
    collector = Collector(BpfSource(PROCFS), ProtectSelectors.build(comms=["renamed-api"]), PROCFS, rescan_s=3600.0)
    try:
        collector.start()
        collector.sample()
        assert pid not in collector.protected
        command(renamer, "name renamed-api")
        time.sleep(0.05)
        collector.sample()
        assert pid in collector.protected and pid in collector.changed
        assert collector.protected_reason[pid] == "comm renamed-api"
    finally:
        collector.close()


def test_the_kernel_counts_protected_threads_coming_and_going_and_the_collector_follows(spawn):
    renamer = start_renamer(spawn)
    pid = renamer.pid
    collector = Collector(BpfSource(PROCFS), ProtectSelectors.build(pids=[pid]), PROCFS)
    try:
        collector.start()
        for _ in range(3):
            collector.sample()
        before = collector.source.protected_changes()
        assert collector.sample().protected.threads == 1
        command(renamer, "thread parked")
        for _ in range(3):  # counted at the next read, followed within two ticks
            time.sleep(0.05)
            threads = collector.sample().protected.threads
        assert threads == 2 and collector.source.protected_changes() == before + 1
        renamer.proc.stdin.write("exit\n")
        renamer.proc.stdin.flush()
        renamer.proc.wait(timeout=10)
        for _ in range(3):
            time.sleep(0.05)
            collector.sample()
        assert pid not in collector.protected
        assert collector.source.protected_changes() == before + 3  # both threads' exits
    finally:
        collector.close()
