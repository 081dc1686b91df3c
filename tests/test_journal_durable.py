"""The journal under write errors, crash leftovers and reboots: never lose an original.

The ENOSPC tests mount a 64 KiB tmpfs (root), fill it to the brim and drive the journal and the
executor into a write that cannot complete.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess

import pytest

from helpers.remediation import make_executor, new_executor, nice_request, thread_nices  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator import journal as journal_module
from remediator.journal import Journal, load_entries
from remediator.procfs import Boot, ProcessIdentity, ProcFS

HOG = ProcessIdentity(2621, 100349)
QUIET = ("--burst-ms", "1", "--period-ms", "1000")  # a hog that hardly runs: these tests need threads, not load
ORIGINAL = {"threads": {"2621": 0}, "default": 0}


def intent(journal: Journal, identity=HOG, kind="nice"):
    return journal.record_intent(identity, kind, policy="p", step_index=0, original=ORIGINAL, target={"nice": 10})


class BrokenDisk:
    """os.write that writes `partial` bytes then fails with `errno_value`; or os.fsync that fails."""

    def __init__(self, monkeypatch, errno_value=errno.ENOSPC, partial=7, call="write"):
        self.failing = False
        real_write, real_fsync = os.write, os.fsync

        def write(fd, data):
            if self.failing and call == "write":
                if partial and len(data) > partial:
                    written = real_write(fd, bytes(data[:partial]))
                    if written:
                        return written
                raise OSError(errno_value, os.strerror(errno_value))
            return real_write(fd, data)

        def fsync(fd):
            if self.failing and call == "fsync":
                raise OSError(errno_value, os.strerror(errno_value))
            return real_fsync(fd)

        monkeypatch.setattr(journal_module.os, "write", write)
        monkeypatch.setattr(journal_module.os, "fsync", fsync)


@pytest.mark.parametrize("call, errno_value", [("write", errno.ENOSPC), ("fsync", errno.EIO)])
def test_a_failed_write_is_cut_back_and_the_next_record_stands_alone(tmp_path, monkeypatch, call, errno_value):
    path = tmp_path / "journal.jsonl"
    disk = BrokenDisk(monkeypatch, errno_value, call=call)
    with Journal(path) as journal:
        live = intent(journal)
        journal.record_applied(live, {"nice": 10})
        good = path.read_bytes()
        disk.failing = True
        with pytest.raises(OSError) as raised:
            intent(journal, identity=ProcessIdentity(7, 8))
        assert raised.value.errno == errno_value
        assert path.read_bytes() == good  # the partial line is gone
        assert [e.identity for e in journal.active()] == [HOG]  # the failed intent does not count
        disk.failing = False
        other = intent(journal, identity=ProcessIdentity(7, 8))
    assert [json.loads(line)["op"] for line in path.read_text().splitlines()] == ["intent", "applied", "intent"]
    assert {e.entry_id for e in load_entries(path)} == {live.entry_id, other.entry_id}


def test_no_record_is_written_while_a_failed_write_cannot_be_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "journal.jsonl"
    disk = BrokenDisk(monkeypatch)
    real_ftruncate = os.ftruncate
    with Journal(path) as journal:
        intent(journal)
        good = path.stat().st_size
        disk.failing = True
        monkeypatch.setattr(journal_module.os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        with pytest.raises(OSError):
            intent(journal, identity=ProcessIdentity(7, 8))
        disk.failing = False
        with pytest.raises(OSError):  # the partial bytes are still there: nothing may be glued on
            intent(journal, identity=ProcessIdentity(9, 9))
        assert path.stat().st_size > good
        monkeypatch.setattr(journal_module.os, "ftruncate", real_ftruncate)
        intent(journal, identity=ProcessIdentity(9, 9))  # cut back first, then written
    assert [r["pid"] for r in map(json.loads, path.read_text().splitlines())] == [HOG.pid, 9]


def test_a_record_glued_onto_a_partial_line_is_read_back(tmp_path, caplog):
    """What an older version left after ENOSPC: partial bytes, then a whole record on the same line."""
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        live = intent(journal)
    whole = path.read_bytes()
    path.write_bytes(b'{"entry":"0bad","kind":"nice","op":"inte' + whole)
    caplog.set_level(logging.WARNING)
    with Journal(path) as journal:
        assert [e.entry_id for e in journal.active()] == [live.entry_id]
    assert "glued onto a partial write" in caplog.text


def test_compaction_never_runs_while_a_line_is_unreadable(tmp_path, caplog):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        entry = intent(journal)
        journal.record_restored(entry, "done")
    with open(path, "ab") as handle:
        handle.write(b'{"entry": "abc", "op": "intent", garbage\n')  # maybe a live intent: keep it
    size = path.stat().st_size
    caplog.set_level(logging.WARNING)
    with Journal(path) as journal:
        assert journal.active() == []
    assert path.stat().st_size == size
    assert "not compacted: line 3 cannot be read" in caplog.text


def test_entries_from_a_previous_boot_are_dropped_not_restored(tmp_path, new_executor):
    path = tmp_path / "journal.jsonl"
    with Journal(path, boot=Boot("old-boot", 1000.0)) as journal:
        # The same pid and start time as this test process: only the boot id tells them apart.
        entry = journal.record_intent(
            ProcFS().identity(os.getpid()),
            "nice", policy="p", step_index=0, original={"threads": {str(os.getpid()): 19}, "default": 19}, target={"nice": 5},
        )
        journal.record_applied(entry, {"nice": 5})
    before = os.getpriority(os.PRIO_PROCESS, 0)
    executor = new_executor(journal_path=path)  # this boot: another id
    assert executor.journal.find(entry.identity, "nice") is None  # a new step would not reuse its original
    [outcome] = executor.restore()
    assert outcome.status == "dropped"
    assert outcome.message == "from a previous boot: process gone: nothing to restore"
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # our own process (same pid, same start time) untouched
    assert executor.active() == []


def test_entries_without_a_boot_id_are_judged_by_their_time(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path, clock=lambda: 500.0, boot=Boot("", 0.0)) as journal:  # written by an older version
        intent(journal)
    assert json.loads(path.read_text())["boot_id"] == ""
    with Journal(path, boot=Boot("now", 1000.0)) as journal:
        [entry] = journal.active()
        assert journal.from_previous_boot(entry)  # written at 500, this boot began at 1000
    with Journal(path, boot=Boot("now", 400.0)) as journal:
        [entry] = journal.active()
        assert not journal.from_previous_boot(entry)  # written during this boot: start time still decides


# -- a real full disk -----------------------------------------------------------------------------


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 KiB tmpfs at tmp_path/disk, and fill() to take every free byte; unmounted even on failure."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount_point)], check=True)
    filler = mount_point / "filler"

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (4096, 1):  # pages first, then whatever bytes are left
                while True:
                    try:
                        os.write(fd, b"x" * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)

    def free() -> None:
        filler.unlink()

    try:
        yield mount_point, fill, free
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def leave_little_room(journal: Journal, below: int) -> None:
    """Append closed entries until the journal's last tmpfs page has fewer than `below` bytes free,
    so the next longer line is written in part before ENOSPC (once the rest of the disk is full)."""
    nobody = ProcessIdentity(0, 0)
    while True:
        room = -journal.path.stat().st_size % 4096
        if 0 < room < below:
            return
        entry = Journal.record_intent(journal, nobody, "nice", policy="padding", step_index=0, original=ORIGINAL, target={"nice": 1})
        journal.record_dropped(entry, "padding")


@pytest.mark.root
def test_a_full_disk_refuses_the_change_and_loses_no_original(spawn, full_tmpfs, caplog):
    mount_point, fill, free = full_tmpfs
    path = mount_point / "journal.jsonl"
    first = spawn(hog_argv("fluent-bit", 2, *QUIET))
    second = spawn(hog_argv("vector", 2, *QUIET))
    executor = make_executor(path)
    try:
        assert executor.apply(nice_request(first.pid, 10), ()).status == "applied"
        request = dataclasses.replace(nice_request(second.pid, 10), evidence={"pad": "x" * 600})
        leave_little_room(executor.journal, 400)  # the intent line is longer: written in part
        fill()
        nices = thread_nices(second.pid)
        refused = executor.apply(request, ())
        assert refused.status == "failed"
        assert refused.message == (
            f"cannot make the original durable in the journal {path} (No space left on device): change refused, nothing changed"
        )
        assert thread_nices(second.pid) == nices  # nothing changed on the process
        assert path.read_bytes().endswith(b"\n")  # no partial line left behind
        again = executor.apply(dataclasses.replace(request, params={"nice": 12}), ())  # still full: refused again, cleanly
        assert again.status == "failed" and thread_nices(second.pid) == nices
    finally:
        executor.journal.close()
    free()
    # Every live entry reads back; compaction on open keeps it; revert restores it.
    [live] = [entry for entry in load_entries(path) if entry.active]
    assert live.identity.pid == first.pid and live.state == "applied"
    restorer = make_executor(path)
    try:
        [outcome] = restorer.restore()
    finally:
        restorer.journal.close()
    assert outcome.status == "restored"
    assert set(thread_nices(first.pid).values()) == {0}


@pytest.mark.root
def test_a_full_disk_at_the_outcome_keeps_the_entry_open_for_restore(spawn, full_tmpfs):
    """The change is made, its `applied` line cannot be written: the intent alone keeps the original."""
    mount_point, fill, free = full_tmpfs
    path = mount_point / "journal.jsonl"
    hog = spawn(hog_argv("fluent-bit", 2, *QUIET))
    executor = make_executor(path)
    real_record_intent = executor.journal.record_intent

    def intent_then_fill(*args, **kwargs):
        entry = real_record_intent(*args, **kwargs)
        leave_little_room(executor.journal, 60)  # the `applied` line is longer
        fill()
        return entry

    executor.journal.record_intent = intent_then_fill
    try:
        outcome = executor.apply(nice_request(hog.pid, 10), ())
    finally:
        executor.journal.close()
    assert outcome.status == "applied", outcome.message
    assert "journal outcome not written: No space left on device; the entry stays open and will be restored" in outcome.message
    assert path.read_bytes().endswith(b"\n")
    free()
    restorer = make_executor(path)
    try:
        [entry] = restorer.active()
        assert entry.state == "pending"
        [restored] = restorer.restore()
    finally:
        restorer.journal.close()
    assert restored.status == "restored" and set(thread_nices(hog.pid).values()) == {0}
