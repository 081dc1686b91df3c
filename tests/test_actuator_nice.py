"""nice on every thread of a real process, restored per thread; kernel refusals as typed outcomes."""

from __future__ import annotations

import errno
import os
import time

import pytest

from helpers.faults import FaultySyscalls
from helpers.remediation import new_executor, nice_request, thread_nices  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator.audit import audit_record
from remediator.engine import Decision
from remediator.procfs import ProcFS

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


def test_the_audit_says_when_the_change_was_in_place(spawn, new_executor):
    """`epoch` is when the engine decided; `changed_epoch` when the last thread was changed, which
    bench/incident.py measures detection to (the journal's fsync comes after it)."""
    hog = spawn(hog_argv(threads=2))
    syscalls = FaultySyscalls()
    last_change = []
    syscalls.before("setpriority", lambda tid: last_change.append(time.time()), skip=2)  # the third thread
    executor = new_executor(syscalls=syscalls)
    decided = time.time()

    outcome = executor.apply(nice_request(hog.pid, 10), ())

    assert outcome.status == "applied", outcome
    assert decided <= last_change[0] <= outcome.changed_at <= time.time()
    decision = Decision("act", 0.0, decided, ProcFS().process_info(hog.pid), None, "step 1")
    record = audit_record(decision, outcome, "live")
    assert record["epoch"] == round(decided, 3) and record["changed_epoch"] == round(outcome.changed_at, 3)
    dry = new_executor(journal_path=None, dry_run=True).apply(nice_request(hog.pid, 15), ())
    assert dry.status == "would-apply" and dry.changed_at is None  # nothing was changed
    assert "changed_epoch" not in audit_record(decision, dry, "dry-run")
    executor.restore()
