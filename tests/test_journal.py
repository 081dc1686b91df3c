"""The journal: originals on disk (fsync'd) before a change, a fold for the state, crash leftovers tolerated."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from remediator import journal as journal_module
from remediator.journal import Journal, JournalError, fold, load_entries, read_records
from remediator.procfs import ProcessIdentity

HOG = ProcessIdentity(2621, 100349)
NICE_ORIGINAL = {"threads": {"2621": 0, "2623": 3}, "default": 0}


def intent(journal: Journal, identity=HOG, kind="nice", original=None, target=None, step=0):
    return journal.record_intent(
        identity,
        kind,
        policy="log-shippers",
        step_index=step,
        original=original if original is not None else NICE_ORIGINAL,
        target=target if target is not None else {"nice": 10},
        evidence={"victim_p99_us": 2400},
    )


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_intent_then_applied_is_active_with_the_original(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
        assert entry.state == "pending" and entry.active
        journal.record_applied(entry, {"nice": 10, "tids": [2621, 2623]})
        [active] = journal.active()
    assert active.identity == HOG
    assert active.original == NICE_ORIGINAL
    assert active.applied == {"nice": 10, "tids": [2621, 2623]}
    assert active.policy == "log-shippers" and active.evidence == {"victim_p99_us": 2400}
    assert [record["op"] for record in lines(path)] == ["intent", "applied"]
    # The fold over the file on disk agrees with the in-memory state.
    [reloaded] = load_entries(path)
    assert reloaded.state == "applied" and reloaded.original == NICE_ORIGINAL


def test_every_record_is_fsynced_before_the_call_returns(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(journal_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "state" / "journal.jsonl"
    with Journal(path) as journal:
        # Creating the file fsyncs the directory (the new name must survive a crash too).
        assert synced, "no fsync when the journal file was created"
        before = len(synced)
        entry = intent(journal)
        assert len(synced) == before + 1
        assert path.read_text().count("\n") == 1  # on disk, not in a buffer
        journal.record_applied(entry, {"nice": 10})
        assert len(synced) == before + 2


def test_parent_directories_are_created_private(tmp_path):
    path = tmp_path / "var" / "lib" / "remediator" / "journal.jsonl"
    previous = os.umask(0o277)  # a umask that would leave the directories unusable (0500)
    try:
        with Journal(path):
            pass
    finally:
        os.umask(previous)
    for directory in (tmp_path / "var", tmp_path / "var" / "lib", tmp_path / "var" / "lib" / "remediator"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_further_step_keeps_the_first_original_and_updates_applied(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        first = intent(journal, target={"nice": 10})
        journal.record_applied(first, {"nice": 10})
        # The ladder asks nice 15: the process now reads 10 everywhere, which is NOT the original.
        second = intent(journal, original={"threads": {"2621": 10, "2623": 10}, "default": 10}, target={"nice": 15}, step=1)
        assert second.entry_id == first.entry_id
        journal.record_applied(second, {"nice": 15})
        [entry] = journal.active()
    assert entry.original == NICE_ORIGINAL
    assert entry.applied == {"nice": 15}
    assert entry.step_index == 1
    # The record on disk repeats the first original, so each intent line stands on its own.
    assert lines(path)[2]["original"] == NICE_ORIGINAL


def test_intent_without_outcome_counts_as_possibly_applied(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        intent(journal)
    with Journal(path) as journal:
        [entry] = journal.active()
    assert entry.state == "pending"


def test_restored_and_dropped_close_entries(tmp_path):
    with Journal(tmp_path / "journal.jsonl") as journal:
        nice = intent(journal)
        journal.record_applied(nice, {"nice": 10})
        affinity = intent(journal, kind="affinity", original={"threads": {}, "default": [0, 1]}, target={"cpus": [1]})
        journal.record_applied(affinity, {"cpus": [1]})
        journal.record_restored(nice, "setpriority(...)")
        assert [entry.kind for entry in journal.active()] == ["affinity"]
        journal.record_dropped(affinity, "pid 2621: process exited")
        assert journal.active() == []
        assert {entry.state for entry in journal.entries()} == {"restored", "dropped"}


def test_failed_first_step_closes_unless_part_of_it_was_left_changed(tmp_path):
    with Journal(tmp_path / "journal.jsonl") as journal:
        clean = intent(journal)
        journal.record_failed(clean, "EPERM; nothing was changed")
        assert journal.get(clean.entry_id).state == "failed"
        messy = intent(journal, kind="affinity", original={"threads": {}, "default": [0, 1]})
        journal.record_failed(messy, "rollback failed", left_changed=True)
        assert journal.get(messy.entry_id).state == "pending"  # restore must still put it back


def test_failed_further_step_keeps_the_previous_step_active(tmp_path):
    with Journal(tmp_path / "journal.jsonl") as journal:
        entry = intent(journal, target={"nice": 10})
        journal.record_applied(entry, {"nice": 10})
        intent(journal, target={"nice": 15}, step=1)
        journal.record_failed(entry, "EPERM; rolled back")
        [active] = journal.active()
    assert active.state == "applied" and active.applied == {"nice": 10}


def test_torn_last_line_is_ignored_with_a_warning_and_cut_off(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
        journal.record_applied(entry, {"nice": 10})
    complete = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(b'{"entry":"' + entry.entry_id.encode() + b'","op":"resto')  # the crash cut this write
    caplog.set_level(logging.WARNING, logger="remediator.journal")
    with Journal(path) as journal:
        [active] = journal.active()
        assert active.state == "applied"
        assert "torn last line" in caplog.text
        assert path.read_bytes() == complete  # the torn bytes are gone...
        journal.record_restored(active, "done")
    # ...so the next record starts on a line of its own.
    assert [record["op"] for record in lines(path)] == ["intent", "applied", "restored"]


def test_unreadable_middle_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
    with open(path, "ab") as handle:
        handle.write(b"not json at all\n")
    caplog.set_level(logging.WARNING)
    records, _, warnings = read_records(path)
    assert len(records) == 1 and "unreadable line" in warnings[0]
    with Journal(path) as journal:
        assert journal.get(entry.entry_id).state == "pending"


def test_a_file_with_only_closed_entries_is_compacted_on_open(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
        journal.record_applied(entry, {"nice": 10})
        journal.record_restored(entry, "done")
    inode_before = path.stat().st_ino
    assert path.stat().st_size > 0
    with Journal(path) as journal:
        assert journal.entries() == []
    assert path.stat().st_size == 0
    assert path.stat().st_ino != inode_before  # a new file renamed into place, not truncated in place
    assert not list(tmp_path.glob(".journal.jsonl.*.tmp"))  # no temporary file left


def test_a_file_with_active_entries_is_not_compacted(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        closed = intent(journal)
        journal.record_restored(closed, "done")
        intent(journal, identity=ProcessIdentity(7, 8))
    size = path.stat().st_size
    with Journal(path) as journal:
        assert len(journal.active()) == 1
    assert path.stat().st_size == size


def test_a_second_writer_is_refused_while_the_first_holds_the_journal(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path):
        with pytest.raises(JournalError, match="in use by another remediator"):
            Journal(path)
    with Journal(path):  # released on close
        pass


def test_fold_ignores_outcomes_of_unknown_entries_and_malformed_records():
    records = [
        {"op": "applied", "entry": "gone-by-compaction", "applied": {}},
        {"op": "intent", "entry": "a", "kind": "nice"},  # no pid: malformed
        {"op": "intent", "entry": "b", "pid": 5, "start_time": 6, "kind": "nice", "original": {"default": 0, "threads": {}}},
    ]
    entries = fold(records)
    assert list(entries) == ["b"]
    assert entries["b"].identity == ProcessIdentity(5, 6)


def test_read_only_reads_without_locking_creating_or_compacting(tmp_path):
    missing = tmp_path / "nowhere" / "journal.jsonl"
    assert Journal(missing, read_only=True).entries() == []
    assert not missing.parent.exists()
    path = tmp_path / "journal.jsonl"
    with Journal(path) as writer:
        entry = intent(writer)
        writer.record_restored(entry, "done")
        intent(writer, identity=ProcessIdentity(9, 9))
        reader = Journal(path, read_only=True)  # beside the writer: no lock conflict
        assert [e.identity.pid for e in reader.active()] == [9]
        with pytest.raises(JournalError, match="read-only"):
            intent(reader)
        writer.record_dropped(writer.active()[0], "gone")
    size = path.stat().st_size
    assert Journal(path, read_only=True).active() == []
    assert path.stat().st_size == size  # only closed entries, yet not compacted by a reader


# -- compaction while open: a file a long-lived entry keeps rewriting stays bounded -------------------

def open_entries(entries) -> list[tuple[dict, dict]]:
    return [(entry.to_json(), entry.evidence) for entry in sorted(entries, key=lambda e: e.order) if entry.active]


def test_an_open_journal_that_grows_is_compacted_to_the_same_open_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMPACT_AT_BYTES", 4096)
    path = tmp_path / "journal.jsonl"
    clock = iter(range(1000, 100000))
    with Journal(path, clock=lambda: float(next(clock))) as journal:
        closed = intent(journal, identity=ProcessIdentity(1, 1))
        journal.record_restored(closed, "done")
        applied = intent(journal)
        journal.record_applied(applied, {"nice": 10})
        further = intent(journal, identity=ProcessIdentity(7, 8))  # a second step whose outcome is unknown
        journal.record_applied(further, {"nice": 10, "set": {"7": 10}})
        intent(journal, identity=ProcessIdentity(7, 8), target={"nice": 15, "set": {"7": 15}}, step=1)
        pending = intent(journal, identity=ProcessIdentity(9, 9), kind="affinity", target={"cpus": [1]})
        inode = path.stat().st_ino
        sizes = []
        for round_number in range(200):  # maintain() rewriting one entry's record
            journal.record_applied(applied, {"nice": 10, "tids": list(range(2621, 2651)), "round": round_number})
            sizes.append(path.stat().st_size)
        assert path.stat().st_ino != inode  # a new file renamed into place
        assert sum(sizes[i + 1] - sizes[i] for i in range(199) if sizes[i + 1] > sizes[i]) > 40_000  # written in all
        assert max(sizes) < 8192  # at most COMPACT_GROWTH times what a compaction leaves (about 1.5 KiB here)
        in_memory = open_entries(journal.entries())
        assert [entry["entry"] for entry, _ in in_memory] == [applied.entry_id, further.entry_id, pending.entry_id]
        assert journal.get(closed.entry_id) is None  # closed entries are not carried over
        assert open_entries(load_entries(path)) == in_memory  # the file folds back to the same state
        assert journal.get(further.entry_id).state == "pending" and journal.get(further.entry_id).applied == {"nice": 10, "set": {"7": 10}}
        assert journal.get(applied.entry_id).applied["round"] == 199
        # Writing goes on into the new file, and a new entry sorts after the old ones.
        later = intent(journal, identity=ProcessIdentity(11, 11))
        assert [entry.entry_id for entry in journal.active()][-1] == later.entry_id
        in_memory = open_entries(journal.entries())
    assert not list(tmp_path.glob(".journal.jsonl.*.tmp"))  # no temporary file left
    with Journal(path) as reopened:
        assert open_entries(reopened.entries()) == in_memory
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_open_journal_is_not_compacted_while_a_line_cannot_be_read(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal_module, "COMPACT_AT_BYTES", 2048)
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
    with open(path, "ab") as handle:
        handle.write(b'{"entry": "abc", "op": "intent", garbage\n')  # maybe a live intent: keep it
    caplog.set_level(logging.WARNING)
    with Journal(path) as journal:
        for round_number in range(100):
            journal.record_applied(journal.get(entry.entry_id), {"nice": 10, "round": round_number})
    assert b"garbage" in path.read_bytes() and path.stat().st_size > 4 * 2048
    assert "not compacted: line 2 cannot be read" in caplog.text


def test_a_compaction_that_fails_leaves_the_journal_as_it_was(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal_module, "COMPACT_AT_BYTES", 2048)
    path = tmp_path / "journal.jsonl"
    caplog.set_level(logging.WARNING)
    with Journal(path) as journal:
        entry = intent(journal)

        def no_room(source, target):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(journal._dir, "rename", no_room)
        for round_number in range(60):
            journal.record_applied(journal.get(entry.entry_id), {"nice": 10, "round": round_number})
    assert "not compacted: No space left on device" in caplog.text
    assert not list(tmp_path.glob(".journal.jsonl.*.tmp"))  # no temporary file left
    assert [record["op"] for record in lines(path)] == ["intent"] + ["applied"] * 60  # every record still there
    [reloaded] = load_entries(path)
    assert reloaded.applied == {"nice": 10, "round": 59}


def test_after_a_compaction_no_record_counts_until_the_new_name_is_durable(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "COMPACT_AT_BYTES", 2048)
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
        directory_syncs = {"fail": True}
        real_fsync = journal._dir.fsync

        def flaky_fsync():
            if directory_syncs["fail"]:
                raise OSError(5, "Input/output error")
            real_fsync()

        monkeypatch.setattr(journal._dir, "fsync", flaky_fsync)
        inode = path.stat().st_ino
        with pytest.raises(OSError, match="Input/output error"):
            for round_number in range(100):
                journal.record_applied(journal.get(entry.entry_id), {"nice": 10, "round": round_number})
        assert path.stat().st_ino != inode  # compacted, but its name is not durable yet: the next record is refused
        size = path.stat().st_size
        directory_syncs["fail"] = False
        journal.record_applied(journal.get(entry.entry_id), {"nice": 10, "round": "after"})
        assert path.stat().st_size > size
    [reloaded] = load_entries(path)
    assert reloaded.applied == {"nice": 10, "round": "after"}
