"""Crash safety: a remediator killed with SIGKILL is undone from its journal, by a fresh Executor and by the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.faults import FaultySyscalls
from helpers.remediation import identity_of, new_executor, thread_masks, thread_nices  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator.journal import Journal
from remediator.procfs import ProcessIdentity

pytestmark = pytest.mark.root

CRASH_APPLY = Path(__file__).resolve().parent / "helpers" / "crash_apply.py"


def crash_argv(journal: Path, pid: int, *options: str) -> list[str]:
    return [sys.executable, str(CRASH_APPLY), "--journal", str(journal), "--pid", str(pid), *options]


def revert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remediator", "revert", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def hog_with_odd_thread(spawn):
    """A 2-thread hog whose first worker starts at nice 3 on CPU 0 only, and its exact state."""
    hog = spawn(hog_argv(threads=2))
    worker = hog.tids()[1]
    os.setpriority(os.PRIO_PROCESS, worker, 3)
    os.sched_setaffinity(worker, {0})
    return hog, thread_nices(hog.pid), thread_masks(hog.pid)


def apply_then_sigkill(spawn, journal: Path, hog) -> None:
    remediator = spawn(crash_argv(journal, hog.pid, "--nice", "10", "--cpus", "1"))
    assert set(thread_nices(hog.pid).values()) == {10}
    assert set(thread_masks(hog.pid).values()) == {frozenset({1})}
    remediator.kill()  # SIGKILL: no cleanup of any kind runs
    assert remediator.proc.returncode == -9


def test_a_fresh_executor_restores_after_sigkill(spawn, tmp_path, new_executor, hog_with_odd_thread):
    hog, nices, masks = hog_with_odd_thread
    journal = tmp_path / "journal.jsonl"
    apply_then_sigkill(spawn, journal, hog)

    outcomes = new_executor(journal_path=journal).restore()

    assert [(o.status, o.kind) for o in outcomes] == [("restored", "affinity"), ("restored", "nice")]
    assert thread_nices(hog.pid) == nices
    assert thread_masks(hog.pid) == masks


def test_revert_all_cli_restores_after_sigkill(spawn, tmp_path, hog_with_odd_thread):
    hog, nices, masks = hog_with_odd_thread
    journal = tmp_path / "journal.jsonl"
    apply_then_sigkill(spawn, journal, hog)

    result = revert_cli("--all", "--journal", str(journal))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"restored affinity pid {hog.pid}: sched_setaffinity(tid, {{0-1}}) on 2 threads and sched_setaffinity(tid, {{0}}) on 1 thread")
    assert lines[1].startswith(f"restored nice pid {hog.pid}: setpriority(PRIO_PROCESS, tid, 0) on 2 threads and setpriority(PRIO_PROCESS, tid, 3) on 1 thread")
    assert thread_nices(hog.pid) == nices
    assert thread_masks(hog.pid) == masks
    # Nothing left to do: a second run says so and succeeds.
    again = revert_cli("--all", "--journal", str(journal))
    assert again.returncode == 0 and again.stdout.startswith("nothing to revert")


def test_a_crash_between_intent_and_outcome_is_restored(spawn, tmp_path, new_executor, hog_with_odd_thread):
    hog, nices, masks = hog_with_odd_thread
    journal = tmp_path / "journal.jsonl"
    crashed = subprocess.run(
        crash_argv(journal, hog.pid, "--nice", "10", "--die-after-setpriority", "1"), capture_output=True, timeout=60
    )
    assert crashed.returncode == -9
    assert sorted(thread_nices(hog.pid).values()) == [0, 3, 10]  # one thread changed, then the crash
    assert [json.loads(line)["op"] for line in journal.read_text().splitlines()] == ["intent"]

    executor = new_executor(journal_path=journal)
    [pending] = executor.active()
    assert pending.state == "pending"
    [outcome] = executor.restore()

    assert outcome.status == "restored"
    assert thread_nices(hog.pid) == nices


def test_a_torn_last_line_is_tolerated(spawn, tmp_path, new_executor, hog_with_odd_thread, caplog):
    hog, nices, masks = hog_with_odd_thread
    journal = tmp_path / "journal.jsonl"
    apply_then_sigkill(spawn, journal, hog)
    with open(journal, "ab") as handle:
        handle.write(b'{"entry":"0123","op":"rest')  # a write the crash cut short
    caplog.set_level(logging.WARNING)

    outcomes = new_executor(journal_path=journal).restore()

    assert {o.status for o in outcomes} == {"restored"}
    assert "torn last line" in caplog.text
    assert thread_nices(hog.pid) == nices and thread_masks(hog.pid) == masks


def test_a_reused_pid_is_dropped_and_never_touched(spawn, tmp_path, new_executor):
    hog = spawn(hog_argv(threads=2))
    real = identity_of(hog.pid)
    earlier = ProcessIdentity(hog.pid, real.start_time - 1)  # the process the journal was about, long gone
    journal = tmp_path / "journal.jsonl"
    with Journal(journal) as writer:
        entry = writer.record_intent(
            earlier, "nice", policy="p", step_index=0,
            original={"threads": {str(hog.pid): 7}, "default": 7}, target={"nice": 15},
        )
        writer.record_applied(entry, {"nice": 15})
    before = thread_nices(hog.pid)
    syscalls = FaultySyscalls()
    executor = new_executor(journal_path=journal, syscalls=syscalls)

    [outcome] = executor.restore_pid(hog.pid)

    assert outcome.status == "dropped"
    assert f"pid reused (started at {real.start_time}, expected {earlier.start_time})" in outcome.message
    assert syscalls.changes() == []
    assert thread_nices(hog.pid) == before
    assert executor.active() == []


def test_revert_cli_reports_failure_with_exit_1(spawn, tmp_path, new_executor, hog_with_odd_thread):
    hog, nices, masks = hog_with_odd_thread
    journal = tmp_path / "journal.jsonl"
    apply_then_sigkill(spawn, journal, hog)
    # An original the kernel will not take back: a mask of CPU 9 only (this host has 0-1).
    lines = journal.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        if record.get("kind") == "affinity":
            record["original"] = {"threads": {tid: [9] for tid in record["original"]["threads"]}, "default": [9]}
    journal.write_text("".join(json.dumps(record) + "\n" for record in records))

    result = revert_cli("--all", "--journal", str(journal))

    assert result.returncode == 1
    assert f"invalid affinity pid {hog.pid}: restored 0 threads, failed on 3: sched_setaffinity(" in result.stdout
    assert f"restored nice pid {hog.pid}" in result.stdout
    assert thread_nices(hog.pid) == nices
    # The failed restore stays in the journal for another attempt.
    with Journal(journal) as reread:
        assert [entry.kind for entry in reread.active()] == ["affinity"]
    os.sched_setaffinity(hog.pid, {0, 1})


def test_revert_cli_refuses_while_another_remediator_holds_the_journal(tmp_path):
    journal = tmp_path / "journal.jsonl"
    with Journal(journal):
        result = revert_cli("--all", "--journal", str(journal))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"remediator: error: journal {journal} is in use by another remediator process (the daemon?): stop it first"
    )
