"""nice on every thread of a real process, restored per thread; kernel refusals as typed outcomes."""

from __future__ import annotations

import errno
import os

import pytest

from helpers.faults import FaultySyscalls
from helpers.remediation import new_executor, nice_request, thread_nices  # noqa: F401  (fixture)
from helpers.workloads import hog_argv

pytestmark = pytest.mark.root


def test_nice_reaches_every_thread_and_comes_back_exactly(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    os.setpriority(os.PRIO_PROCESS, hog.tids()[-1], 3)  # one worker starts at its own nice
    before = thread_nices(hog.pid)
    assert len(before) == 3 and sorted(before.values()) == [0, 0, 3]
    executor = new_executor()

    outcome = executor.apply(nice_request(hog.pid, 10), protected_pids=())

    assert outcome.status == "applied", outcome
    assert outcome.threads == 3
    assert outcome.message == f"setpriority(PRIO_PROCESS, tid, 10) on 3 threads of pid {hog.pid} (was 0 on 2 threads, 3 on 1 thread)"
    assert set(thread_nices(hog.pid).values()) == {10}
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert thread_nices(hog.pid) == before  # the worker at 3 gets 3 back, the others 0
    assert executor.active() == []


def test_a_further_step_keeps_the_first_original(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    before = thread_nices(hog.pid)
    executor = new_executor()
    assert executor.apply(nice_request(hog.pid, 10), ()).status == "applied"
    second = executor.apply(nice_request(hog.pid, 15, step=1), ())
    assert second.status == "applied" and "(was 10)" in second.message
    [entry] = executor.active()
    assert entry.applied["nice"] == 15 and entry.step_index == 1
    assert set(entry.original["threads"].values()) == {0}
    executor.restore()
    assert thread_nices(hog.pid) == before


def test_asking_for_the_value_already_in_place_changes_nothing(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    for tid in hog.tids():
        os.setpriority(os.PRIO_PROCESS, tid, 5)
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    outcome = executor.apply(nice_request(hog.pid, 5), ())
    assert outcome.status == "unchanged"
    assert syscalls.changes() == []
    assert executor.active() == []


def test_eperm_is_a_denied_outcome_and_half_a_change_is_rolled_back(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    before = thread_nices(hog.pid)
    syscalls = FaultySyscalls()
    syscalls.inject("setpriority", errno.EPERM, skip=1, times=1)  # the second thread refuses
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(nice_request(hog.pid, 10), ())

    assert outcome.status == "denied"
    assert "EPERM" in outcome.message and "1 thread already changed were rolled back" in outcome.message
    assert thread_nices(hog.pid) == before
    assert executor.active() == []  # closed as failed: nothing left to restore
    assert [entry.state for entry in executor.journal.entries()] == ["failed"]


def test_out_of_range_nice_is_invalid_and_touches_nothing(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    outcome = executor.apply(nice_request(hog.pid, 25), ())
    assert outcome.status == "invalid" and "-20 to 19" in outcome.message
    assert syscalls.changes() == []
