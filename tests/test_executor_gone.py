"""Processes that leave, pids that get reused, and processes that are off limits: outcomes, not exceptions."""

from __future__ import annotations

import os

import pytest

from helpers.faults import FaultySyscalls
from helpers.remediation import affinity_request, identity_of, new_executor, nice_request, thread_nices  # noqa: F401
from helpers.workloads import hog_argv
from remediator.model import ActionRequest
from remediator.procfs import ProcessIdentity

pytestmark = pytest.mark.root


def test_process_leaving_between_read_and_apply_is_gone(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    syscalls = FaultySyscalls()
    syscalls.before("setpriority", lambda tid: hog.kill())  # exits (and is reaped) right before the first change
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(nice_request(hog.pid, 10), ())

    assert outcome.status == "gone", outcome
    assert outcome.message == f"pid {hog.pid}: process exited during the change"
    # The intent was written before the change, and closed once the process was known gone.
    assert [entry.state for entry in executor.journal.entries()] == ["dropped"]
    assert executor.active() == []


def test_process_leaving_during_affinity_is_gone(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    syscalls = FaultySyscalls()
    syscalls.before("sched_setaffinity", lambda tid: hog.kill())
    outcome = new_executor(syscalls=syscalls).apply(affinity_request(hog.pid, {1}), ())
    assert outcome.status == "gone"


def test_process_already_gone_is_gone_with_no_journal_record(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    request = nice_request(hog.pid, 10)
    hog.kill()
    executor = new_executor()
    outcome = executor.apply(request, ())
    assert outcome.status == "gone" and outcome.message == f"pid {hog.pid}: process exited"
    assert executor.journal.entries() == []


def test_a_request_for_an_earlier_process_with_the_same_pid_is_not_applied(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    real = identity_of(hog.pid)
    stale = ActionRequest(ProcessIdentity(hog.pid, real.start_time - 5), "nice", "p", 0, {"nice": 10})
    syscalls = FaultySyscalls()
    outcome = new_executor(syscalls=syscalls).apply(stale, ())
    assert outcome.status == "gone"
    assert "was reused" in outcome.message and "not touched" in outcome.message
    assert syscalls.changes() == [] and set(thread_nices(hog.pid).values()) == {0}


def test_a_protected_process_is_refused(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    syscalls = FaultySyscalls()
    outcome = new_executor(syscalls=syscalls).apply(nice_request(hog.pid, 10), protected_pids={hog.pid})
    assert outcome.status == "refused"
    assert outcome.message == f"pid {hog.pid} (fluent-bit) is off limits: protected service"
    assert syscalls.calls == []


def test_a_child_of_remediator_is_refused(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))  # started by this very process
    outcome = new_executor(self_pid=os.getpid()).apply(nice_request(hog.pid, 10), ())
    assert outcome.status == "refused" and "a child of remediator" in outcome.message
    assert set(thread_nices(hog.pid).values()) == {0}


def test_maintain_drops_entries_of_processes_that_left(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    executor = new_executor()
    assert executor.apply(nice_request(hog.pid, 10), ()).status == "applied"
    hog.kill()
    [dropped] = executor.maintain()
    assert dropped.status == "dropped"
    assert dropped.message == f"pid {hog.pid}: process exited: nothing to restore"
    assert executor.active() == [] and executor.restore() == []


def test_an_unknown_kind_is_invalid(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    outcome = new_executor().apply(ActionRequest(identity_of(hog.pid), "ionice", "p", 0), ())
    assert outcome.status == "invalid" and "unknown action kind 'ionice'" in outcome.message
