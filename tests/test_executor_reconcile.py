"""Start-up after a previous run: restore or keep (and re-adopt) what the journal says is in place."""

from __future__ import annotations

import os

import pytest

from helpers.remediation import affinity_request, new_executor, nice_request, thread_masks, thread_nices  # noqa: F401
from helpers.workloads import hog_argv

pytestmark = pytest.mark.root


def test_reconcile_restore_undoes_what_a_previous_run_left(spawn, new_executor):
    hog, other = spawn(hog_argv(threads=1)), spawn(hog_argv(threads=1))
    previous = new_executor()
    previous.apply(nice_request(hog.pid, 10), ())
    previous.apply(nice_request(other.pid, 12), ())
    previous.journal.close()
    other.kill()

    outcomes = new_executor().reconcile("restore")

    assert sorted((o.status, o.identity.pid) for o in outcomes) == [("dropped", other.pid), ("restored", hog.pid)]
    assert set(thread_nices(hog.pid).values()) == {0}


def test_reconcile_keep_readopts_and_maintain_covers_threads_born_meanwhile(spawn, new_executor):
    hog = spawn(hog_argv("fluent-bit", 1, "--extra-thread-after", "1.0"))
    previous = new_executor()
    assert previous.apply(affinity_request(hog.pid, {1}), ()).status == "applied"
    previous.journal.close()  # the daemon stops (or dies) here
    extra = int(hog.read_line().split("tid=")[1])
    os.sched_setaffinity(extra, {0, 1})  # born while no remediator ran, with a mask of its own

    executor = new_executor()
    [kept] = executor.reconcile("keep")
    assert kept.status == "unchanged" and kept.message.startswith("kept affinity {1} from policy log-shippers")
    assert thread_masks(hog.pid)[extra] == {0, 1}
    [maintained] = executor.maintain()
    assert maintained.status == "applied" and thread_masks(hog.pid)[extra] == {1}
    executor.restore()
    assert set(thread_masks(hog.pid).values()) == {frozenset({0, 1})}


def test_reconcile_keep_still_restores_a_change_whose_outcome_was_never_written(spawn, new_executor, tmp_path):
    hog = spawn(hog_argv(threads=1))
    previous = new_executor()
    assert previous.apply(nice_request(hog.pid, 10), ()).status == "applied"
    previous.journal.close()
    # Cut the "applied" record: as if the crash came between the change and its outcome.
    path = tmp_path / "journal.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])

    [outcome] = new_executor().reconcile("keep")

    assert outcome.status == "restored"
    assert set(thread_nices(hog.pid).values()) == {0}


def test_reconcile_rejects_an_unknown_mode(new_executor):
    with pytest.raises(ValueError, match="restore, keep"):
        new_executor().reconcile("ignore")
