"""CPU affinity on every thread of a real process, kept on new threads, narrowed to what the cpuset allows."""

from __future__ import annotations

import errno
import os

import pytest

from helpers.cgroups import move_to, no_leftover_cgroups, scratch_cpuset  # noqa: F401  (fixtures)
from helpers.faults import FaultySyscalls
from helpers.remediation import affinity_request, new_executor, thread_masks  # noqa: F401  (fixture)
from helpers.workloads import hog_argv

pytestmark = pytest.mark.root

ALL = frozenset({0, 1})


def test_affinity_reaches_every_thread_new_ones_too_and_restores_each_mask(spawn, new_executor):
    hog = spawn(hog_argv("fluent-bit", 2, "--extra-thread-after", "1.5"))
    main, first_worker, _ = hog.tids()
    os.sched_setaffinity(first_worker, {0})  # a thread with a mask of its own
    before = thread_masks(hog.pid)
    assert before[main] == ALL and before[first_worker] == {0}
    executor = new_executor()

    outcome = executor.apply(affinity_request(hog.pid, {1}), ())

    assert outcome.status == "applied", outcome
    assert outcome.message == f"sched_setaffinity(tid, {{1}}) on 3 threads of pid {hog.pid} (was 0-1 on 2 threads, 0 on 1 thread)"
    assert set(thread_masks(hog.pid).values()) == {frozenset({1})}

    extra = int(hog.read_line().split("tid=")[1])
    # A new thread inherits its creator's mask; runtimes that pin their own threads reset it, as
    # this one does now. maintain() must put the remediator mask back on it.
    os.sched_setaffinity(extra, ALL)
    [kept] = executor.maintain()
    assert kept.status == "applied" and kept.threads == 1, kept
    assert kept.message == f"sched_setaffinity(tid, {{1}}) on 1 new thread of pid {hog.pid}"
    assert thread_masks(hog.pid)[extra] == {1}
    assert executor.maintain() == []  # nothing new since

    [restored] = executor.restore()
    assert restored.status == "restored", restored
    after = thread_masks(hog.pid)
    assert {tid: after[tid] for tid in before} == before  # each thread its own original
    assert after[extra] == before[main]  # a thread born after the change gets the default (main thread's)


def test_target_outside_the_cpuset_is_invalid_and_nothing_changes(spawn, new_executor, scratch_cpuset, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=2))
    service_cgroup = scratch_cpuset("1")  # the hog's own cgroup only allows CPU 1
    move_to(service_cgroup, hog.pid)
    before = thread_masks(hog.pid)
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(affinity_request(hog.pid, {0}), ())

    assert outcome.status == "invalid"
    assert f"cpuset /{service_cgroup.name} allows 1" in outcome.message and "nothing changed" in outcome.message
    assert thread_masks(hog.pid) == before
    assert syscalls.changes() == []
    assert executor.journal.entries() == []


def test_target_partly_outside_the_cpuset_is_narrowed_and_says_so(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    executor = new_executor()
    outcome = executor.apply(affinity_request(hog.pid, {1, 5}), ())  # this host has CPUs 0-1 only
    assert outcome.status == "applied", outcome
    assert outcome.message.endswith("(was 0-1); requested 1,5, cpuset / allows 0-1")
    assert outcome.applied["cpus"] == [1] and outcome.applied["requested"] == [1, 5]
    assert set(thread_masks(hog.pid).values()) == {frozenset({1})}
    executor.restore()
    assert set(thread_masks(hog.pid).values()) == {ALL}


def test_einval_from_the_kernel_is_an_invalid_outcome(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    before = thread_masks(hog.pid)
    syscalls = FaultySyscalls()
    syscalls.inject("sched_setaffinity", errno.EINVAL, times=1)
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(affinity_request(hog.pid, {1}), ())

    assert outcome.status == "invalid"
    assert "EINVAL" in outcome.message and "no CPU this thread may run on" in outcome.message
    assert "nothing was changed" in outcome.message
    assert thread_masks(hog.pid) == before


def test_eperm_from_the_kernel_is_a_denied_outcome_after_rollback(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    before = thread_masks(hog.pid)
    syscalls = FaultySyscalls()
    syscalls.inject("sched_setaffinity", errno.EPERM, skip=2, times=1)  # the third thread refuses
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(affinity_request(hog.pid, {1}), ())

    assert outcome.status == "denied"
    assert "EPERM" in outcome.message and "2 threads already changed were rolled back" in outcome.message
    assert thread_masks(hog.pid) == before
    assert executor.active() == []


def test_eperm_on_a_new_thread_in_maintain_is_reported_once(spawn, new_executor):
    hog = spawn(hog_argv("fluent-bit", 1, "--extra-thread-after", "1.0"))
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    assert executor.apply(affinity_request(hog.pid, {1}), ()).status == "applied"
    extra = int(hog.read_line().split("tid=")[1])
    os.sched_setaffinity(extra, ALL)
    syscalls.inject("sched_setaffinity", errno.EPERM)
    [denied] = executor.maintain()
    assert denied.status == "denied" and str(extra) in denied.message
    assert executor.maintain() == []  # not repeated every tick
    syscalls.faults.clear()
    executor.restore()
