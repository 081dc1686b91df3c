"""Dry run: the exact change, from real reads, and nothing changed anywhere (process, cgroups, journal)."""

from __future__ import annotations

import inspect

import pytest

import remediator.actuators as actuators

from helpers.cgroups import cpuset_path_of, no_leftover_cgroups  # noqa: F401  (fixture)
from helpers.faults import FaultySyscalls
from helpers.remediation import (  # noqa: F401  (fixture)
    NOT_OUR_PID,
    affinity_request,
    cpuset_request,
    make_executor,
    new_executor,
    nice_request,
    thread_masks,
    thread_nices,
)
from helpers.workloads import hog_argv
from remediator.executor import Executor
from remediator.journal import Journal, JournalError
from remediator.procfs import ProcFS

pytestmark = pytest.mark.root


def test_dry_run_describes_each_change_exactly_and_changes_nothing(spawn, tmp_path, new_executor, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=2))
    nices, masks = thread_nices(hog.pid), thread_masks(hog.pid)
    syscalls = FaultySyscalls()
    executor = new_executor(journal_path=None, dry_run=True, syscalls=syscalls)
    cgroup = no_leftover_cgroups / "remediator-dry-run-check"

    nice = executor.apply(nice_request(hog.pid, 10), ())
    affinity = executor.apply(affinity_request(hog.pid, {1}), ())
    cpuset = executor.apply(cpuset_request(hog.pid, {1}, "dry-run-check"), ())

    assert (nice.status, affinity.status, cpuset.status) == ("would-apply",) * 3
    assert nice.message == f"setpriority(PRIO_PROCESS, tid, 10) on 3 threads of pid {hog.pid} (was 0)"
    assert affinity.message == f"sched_setaffinity(tid, {{1}}) on 3 threads of pid {hog.pid} (was 0-1)"
    assert cpuset.message == (
        f'mkdir {cgroup}; write "1" to .../cpuset.cpus; write "0" to .../cpuset.mems; '
        f'write "{hog.pid}" to .../cgroup.procs (was /)'
    )
    assert thread_nices(hog.pid) == nices
    assert thread_masks(hog.pid) == masks
    assert cpuset_path_of(hog.pid) == "/" and not cgroup.exists()
    assert syscalls.changes() == []  # it read (getpriority, sched_getaffinity) and nothing else
    assert {call[0] for call in syscalls.calls} == {"getpriority", "sched_getaffinity"}
    # Nothing to maintain or restore: nothing was done.
    assert executor.maintain() == [] and executor.restore() == [] and executor.reconcile("restore") == []


def test_dry_run_writes_no_journal_records_even_when_given_one(spawn, tmp_path):
    hog = spawn(hog_argv(threads=1))
    path = tmp_path / "journal.jsonl"
    executor = make_executor(path, dry_run=True)
    try:
        assert executor.apply(nice_request(hog.pid, 10), ()).status == "would-apply"
        assert executor.apply(affinity_request(hog.pid, {1}), ()).status == "would-apply"
    finally:
        executor.journal.close()
    assert path.read_text() == ""
    assert set(thread_nices(hog.pid).values()) == {0}


def test_dry_run_of_a_further_step_reads_the_journal_without_locking_it(spawn, tmp_path, new_executor):
    hog = spawn(hog_argv(threads=1))
    real = new_executor()
    assert real.apply(nice_request(hog.pid, 10), ()).status == "applied"
    size = (tmp_path / "journal.jsonl").stat().st_size
    # A dry run beside a running remediator: read-only, so no lock conflict and no write.
    dry = Executor(Journal(tmp_path / "journal.jsonl", read_only=True), ProcFS(), dry_run=True, self_pid=NOT_OUR_PID)

    outcome = dry.apply(nice_request(hog.pid, 15, step=1), ())

    assert outcome.status == "would-apply"
    assert outcome.message == f"setpriority(PRIO_PROCESS, tid, 15) on 2 threads of pid {hog.pid} (was 10)"
    assert outcome.original["default"] == 0  # the journal's first original, not today's value
    assert set(thread_nices(hog.pid).values()) == {10}
    assert (tmp_path / "journal.jsonl").stat().st_size == size
    with pytest.raises(JournalError, match="read-only"):
        dry.journal.record_dropped(dry.active()[0], "test")
    real.restore()
    assert set(thread_nices(hog.pid).values()) == {0}


@pytest.mark.parametrize("actuator", ["AffinityActuator", "CpuActuator", "CpusetActuator", "NiceActuator", "SchedActuator", "DryRun"])
def test_every_actuator_takes_what_the_executor_may_pass_to_maintain(actuator):
    """The executor passes `journalled=` while it holds back an entry's record: an actuator that
    did not take it would raise TypeError out of the tick."""
    parameters = inspect.signature(getattr(actuators, actuator).maintain).parameters
    assert "journalled" in parameters and parameters["journalled"].kind is inspect.Parameter.KEYWORD_ONLY
