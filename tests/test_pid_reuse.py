"""Pid reuse in the middle of a change: the process is held from the identity check to the end, and a
stranger that took the pid is never left changed. Reuse is forced with /proc/sys/kernel/ns_last_pid."""

from __future__ import annotations

import os

import pytest

from helpers.faults import FaultySyscalls
from helpers.pidreuse import SLEEPER_ARGV, take_pid
from helpers.remediation import new_executor, nice_request, thread_nices  # noqa: F401  (fixture)
from remediator.journal import Journal

pytestmark = pytest.mark.root


def replace_with_stranger(hog, spawn):
    """Kill the hog (reaped) and start a stranger with its pid; returns the stranger."""
    hog.kill()
    return take_pid(hog.pid, spawn)


def test_reuse_while_the_intent_is_written_changes_nothing(spawn, new_executor):
    hog = spawn(SLEEPER_ARGV)
    request = nice_request(hog.pid, 10)
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    strangers = []
    real_record_intent = executor.journal.record_intent

    def intent_then_reuse(*args, **kwargs):
        entry = real_record_intent(*args, **kwargs)  # fsync'd: the window the hold covers
        strangers.append(replace_with_stranger(hog, spawn))
        return entry

    executor.journal.record_intent = intent_then_reuse

    outcome = executor.apply(request, ())

    [stranger] = strangers
    assert stranger.pid == hog.pid
    assert outcome.status == "gone", outcome.message
    assert syscalls.changes() == []
    assert thread_nices(stranger.pid) == {stranger.pid: 5}
    assert executor.active() == []  # the entry is closed: nothing of it to restore


def test_reuse_between_listing_the_threads_and_setting_them_is_put_back(spawn, new_executor):
    hog = spawn(SLEEPER_ARGV)
    request = nice_request(hog.pid, 10)
    syscalls = FaultySyscalls()
    strangers = []
    # The executor's plan reads one getpriority per thread (3); the change then reads each thread
    # right before setting it: the reuse lands just before the first of those.
    syscalls.before("getpriority", lambda tid: strangers.append(replace_with_stranger(hog, spawn)), skip=3)
    executor = new_executor(syscalls=syscalls)

    outcome = executor.apply(request, ())

    [stranger] = strangers
    assert stranger.pid == hog.pid
    # The set on the main thread's number landed on the stranger, and was put back.
    assert ("setpriority", stranger.pid, 10) in syscalls.changes()
    assert outcome.status == "gone"
    assert "1 thread of another process that took the number put back as they were" in outcome.message
    assert thread_nices(stranger.pid) == {stranger.pid: 5}
    assert executor.active() == []


def test_restore_never_reaches_the_process_that_took_the_pid(spawn, new_executor, tmp_path):
    hog = spawn(SLEEPER_ARGV)
    path = tmp_path / "journal.jsonl"
    applier = new_executor(journal_path=path)
    assert applier.apply(nice_request(hog.pid, 10), ()).status == "applied"
    applier.journal.close()
    syscalls = FaultySyscalls()
    strangers = []
    # restore: verify (held), list threads, then get/set each: reuse before the first read.
    syscalls.before("getpriority", lambda tid: strangers.append(replace_with_stranger(hog, spawn)))
    restorer = new_executor(journal_path=path, syscalls=syscalls)

    [outcome] = restorer.restore()

    [stranger] = strangers
    assert outcome.status == "dropped", outcome.message
    # Restore writes only a thread still holding the nice remediator set (10): the stranger's 5 is
    # not ours, so it is never written at all (no set to put back afterwards).
    assert [call for call in syscalls.changes() if call[1] == stranger.pid] == []
    assert thread_nices(stranger.pid) == {stranger.pid: 5}
    restorer.journal.close()
    with Journal(path) as journal:
        assert journal.active() == []


def test_without_a_hold_the_stranger_would_have_been_changed(spawn):
    """The test's own check: the forced reuse really gives the pid to a new process."""
    hog = spawn(SLEEPER_ARGV)
    stranger = replace_with_stranger(hog, spawn)
    assert stranger.pid == hog.pid
    assert os.getpriority(os.PRIO_PROCESS, stranger.pid) == 5


@pytest.mark.parametrize("reused_before", ["cgroups", "uids", "cmdline"])
def test_a_process_read_while_its_pid_is_taken_is_gone_not_a_mix(spawn, reused_before):
    """ProcFS.process_info reads a new process's files one by one (stat, cgroup, status, exe,
    cmdline): when it exits and a stranger takes its pid in between, the result is ProcessGone,
    never the first process's start time with the stranger's files."""
    from remediator.errors import ProcessGone
    from remediator.procfs import ProcFS

    hog = spawn(SLEEPER_ARGV)
    procfs = ProcFS()
    strangers = []
    real = getattr(procfs, reused_before)

    def reuse_then_read(pid, *args, **kwargs):
        if pid == hog.pid and not strangers:
            strangers.append(replace_with_stranger(hog, spawn))
        return real(pid, *args, **kwargs)

    setattr(procfs, reused_before, reuse_then_read)
    with pytest.raises(ProcessGone):
        info = procfs.process_info(hog.pid)
        pytest.fail(f"read as {info} (the stranger's comm and cmdline under the first one's start time?)")
    [stranger] = strangers
    assert stranger.pid == hog.pid
