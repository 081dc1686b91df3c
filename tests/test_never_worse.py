"""Never make things worse: a step only lowers what a thread gets, and restore and maintain touch only
what still holds the value remediator set (an operator's renice or taskset made since stands)."""

from __future__ import annotations

import os
import time

import pytest

from helpers.remediation import (  # noqa: F401  (fixture)
    affinity_request,
    identity_of,
    new_executor,
    nice_request,
    thread_masks,
    thread_nices,
)
from helpers.workloads import hog_argv
from remediator.actuators.affinity import narrowed_mask
from remediator.actuators.nice import weaker_nice
from remediator.audit import audit_record
from remediator.engine import Decision
from remediator.journal import Journal
from remediator.procfs import ProcFS

ALL = frozenset({0, 1})


# -- the rules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("current", "step", "expected"),
    [(0, 10, 10), (19, 10, None), (10, 10, None), (-5, 0, 0), (15, 19, 19)],
)
def test_a_nice_step_only_ever_lowers_priority(current, step, expected):
    assert weaker_nice(current, step) == expected


@pytest.mark.parametrize(
    ("current", "step", "expected"),
    [
        ({0, 1}, {1}, {1}),  # narrowed
        ({1}, {1}, None),  # already there
        ({1}, {0, 1}, None),  # never widened
        ({0, 2}, {1, 2}, {2}),  # the overlap: no CPU it did not have
        ({0}, {1}, {1}),  # only on CPUs the step keeps it off: moved
    ],
)
def test_an_affinity_step_never_widens_a_mask(current, step, expected):
    result = narrowed_mask(frozenset(current), frozenset(step))
    assert result == (None if expected is None else frozenset(expected))


# -- the rules on real threads --------------------------------------------------------------------------


@pytest.mark.root
def test_a_backup_at_nice_19_is_unchanged_by_a_nice_10_step(spawn, new_executor):
    hog = spawn(hog_argv("restic", 2))
    for tid in hog.tids():
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    executor = new_executor()
    outcome = executor.apply(nice_request(hog.pid, 10), ())
    assert outcome.status == "unchanged", outcome
    assert outcome.message == (
        f"nice of 3 threads of pid {hog.pid}: nothing to change; 3 threads already at nice 10 or weaker (19): left as they are"
    )
    assert set(thread_nices(hog.pid).values()) == {19}
    assert executor.active() == []


@pytest.mark.root
def test_a_nice_step_leaves_the_threads_already_nicer(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    main, worker, other = hog.tids()
    os.setpriority(os.PRIO_PROCESS, worker, 19)
    executor = new_executor()
    outcome = executor.apply(nice_request(hog.pid, 10), ())
    assert outcome.status == "applied" and outcome.threads == 2, outcome
    assert outcome.message == (
        f"setpriority(PRIO_PROCESS, tid, 10) on 2 threads of pid {hog.pid} (was 0); "
        "1 thread already at nice 10 or weaker (19): left as it is"
    )
    assert thread_nices(hog.pid) == {main: 10, worker: 19, other: 10}
    [entry] = executor.active()
    assert entry.applied["set"] == {str(main): 10, str(other): 10}
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert thread_nices(hog.pid) == {main: 0, worker: 19, other: 0}


@pytest.mark.root
def test_a_thread_pinned_within_the_step_is_not_widened(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    main, worker, other = hog.tids()
    os.sched_setaffinity(worker, {1})
    executor = new_executor()
    # {0, 1} from a thread on {1} would widen it; {1} on the others narrows them.
    assert executor.apply(affinity_request(hog.pid, {0, 1}), ()).status == "unchanged"
    outcome = executor.apply(affinity_request(hog.pid, {1}), ())
    assert outcome.status == "applied" and outcome.threads == 2, outcome
    assert outcome.message.endswith("; 1 thread already within {1} (1): left as it is")
    assert executor.active()[0].applied["set"] == {str(main): [1], str(other): [1]}
    executor.restore()
    assert thread_masks(hog.pid) == {main: ALL, worker: {1}, other: ALL}


# -- an operator's change made after ours stands -----------------------------------------------------

@pytest.mark.root
def test_revert_and_maintain_leave_an_operators_renice_and_taskset(spawn, new_executor):
    hog = spawn(hog_argv(threads=3))
    main, reniced, pinned, untouched = hog.tids()
    executor = new_executor()
    assert executor.apply(nice_request(hog.pid, 10), ()).status == "applied"
    assert executor.apply(affinity_request(hog.pid, {1}), ()).status == "applied"

    os.setpriority(os.PRIO_PROCESS, reniced, 5)  # the operator wants this one back sooner
    os.sched_setaffinity(pinned, {0})  # and this one elsewhere

    noticed = executor.maintain()
    assert sorted((o.kind, o.status) for o in noticed) == [("affinity", "left-changed-by-other"), ("nice", "left-changed-by-other")]
    nice_note = next(o for o in noticed if o.kind == "nice")
    assert nice_note.message == (
        f"pid {hog.pid}: 1 thread changed by someone else since remediator set it, left as it is: "
        f"tid {reniced} is 5 (remediator set 10)"
    )
    assert executor.maintain() == []  # said once, not every tick
    assert thread_nices(hog.pid)[reniced] == 5 and thread_masks(hog.pid)[pinned] == {0}  # not overwritten

    outcomes = {o.kind: o for o in executor.restore()}
    assert outcomes["nice"].status == "restored" and outcomes["affinity"].status == "restored"
    assert outcomes["nice"].left == {"threads": {str(reniced): {"now": 5, "set": 10}}}
    assert outcomes["affinity"].left == {"threads": {str(pinned): {"now": [0], "set": [1]}}}
    assert f"tid {reniced} is 5 (remediator set 10)" in outcomes["nice"].message
    assert thread_nices(hog.pid) == {main: 0, reniced: 5, pinned: 0, untouched: 0}
    assert thread_masks(hog.pid) == {main: ALL, reniced: ALL, pinned: {0}, untouched: ALL}
    assert executor.active() == []  # the entries are closed all the same

    decision = Decision("revert", 0.0, 0.0, ProcFS().process_info(hog.pid), None, "quiet again")
    record = audit_record(decision, outcomes["nice"], "live")
    assert record["outcome"] == "restored"
    assert record["left_changed_by_other"] == {"threads": {str(reniced): {"now": 5, "set": 10}}}


@pytest.mark.root
def test_revert_of_a_change_someone_else_undid_everywhere_says_so(spawn, new_executor):
    hog = spawn(hog_argv(threads=1))
    executor = new_executor()
    assert executor.apply(nice_request(hog.pid, 10), ()).status == "applied"
    for tid in hog.tids():
        os.setpriority(os.PRIO_PROCESS, tid, 15)
    [outcome] = executor.restore()
    assert outcome.status == "left-changed-by-other" and not outcome.is_error, outcome
    assert outcome.message.startswith(f"no thread to restore of pid {hog.pid} (was unknown); 2 threads changed by someone else")
    assert set(thread_nices(hog.pid).values()) == {15}
    assert executor.active() == []


@pytest.mark.root
def test_a_later_step_leaves_a_thread_the_operator_changed(spawn, new_executor):
    hog = spawn(hog_argv(threads=2))
    main, reniced, other = hog.tids()
    executor = new_executor()
    assert executor.apply(nice_request(hog.pid, 10), ()).status == "applied"
    os.setpriority(os.PRIO_PROCESS, reniced, 3)
    second = executor.apply(nice_request(hog.pid, 15, step=1), ())
    assert second.status == "applied" and second.threads == 2, second
    assert f"tid {reniced} is 3 (remediator set 10)" in second.message
    assert thread_nices(hog.pid) == {main: 15, reniced: 3, other: 15}
    executor.restore()
    assert thread_nices(hog.pid) == {main: 0, reniced: 3, other: 0}


@pytest.mark.root
def test_a_thread_born_later_gets_the_change_and_keeps_an_operators_value_across_a_restart(spawn, new_executor):
    hog = spawn(hog_argv("fluent-bit", 1, "--extra-thread-after", "1.0", "--extra-thread-resets"))
    previous = new_executor()
    assert previous.apply(nice_request(hog.pid, 10), ()).status == "applied"
    extra = int(hog.read_line().split("tid=")[1])
    # It resets the nice it inherited as it starts (just after announcing itself): wait for that.
    deadline = time.monotonic() + 10
    while thread_nices(hog.pid)[extra] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread_nices(hog.pid)[extra] == 0
    [redone] = previous.maintain()
    assert redone.status == "applied" and redone.message == f"setpriority(PRIO_PROCESS, tid, 10) on 1 new thread of pid {hog.pid}"
    assert previous.active()[0].applied["set"][str(extra)] == 10  # journalled: ours after a restart too
    previous.journal.close()  # the daemon stops here

    os.setpriority(os.PRIO_PROCESS, extra, 2)  # meanwhile the operator reniced it
    executor = new_executor()
    [kept] = executor.reconcile("keep")
    assert kept.status == "unchanged"
    [noticed] = executor.maintain()
    assert noticed.status == "left-changed-by-other" and f"tid {extra} is 2" in noticed.message
    assert thread_nices(hog.pid)[extra] == 2
    executor.restore()
    assert thread_nices(hog.pid)[extra] == 2 and thread_nices(hog.pid)[hog.pid] == 0


@pytest.mark.root
def test_an_entry_from_before_per_thread_values_is_restored_unconditionally(spawn, tmp_path, new_executor):
    # The previous journal format had no "set" in the applied record: what remediator set per
    # thread is unknown, so such an entry is restored as it was then, whatever the thread holds now.
    hog = spawn(hog_argv(threads=2))
    tids = hog.tids()
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = journal.record_intent(
            identity_of(hog.pid), "nice", policy="log-shippers", step_index=0,
            original={"threads": {str(tid): 0 for tid in tids}, "default": 0}, target={"nice": 10},
        )
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, 10)
        journal.record_applied(entry, {"nice": 10, "tids": tids})
    os.setpriority(os.PRIO_PROCESS, tids[1], 5)
    [restored] = new_executor(path).restore()
    assert restored.status == "restored" and restored.left is None, restored
    assert set(thread_nices(hog.pid).values()) == {0}
