"""The durable journal of changes: originals first, on disk, before anything is touched.

One JSON object per line, appended and fsync'd (the directory too when the file is created):

    {"op": "intent",   "entry": E, "pid", "start_time", "kind", "policy", "step", "original", "target", ...}
    {"op": "applied",  "entry": E, "applied": {...}}
    {"op": "failed",   "entry": E, "reason": "...", "left_changed": false}
    {"op": "restored", "entry": E, "detail": "..."}
    {"op": "dropped",  "entry": E, "reason": "..."}        (process gone, or the change cannot be undone)

The executor writes the intent (with the original) and fsyncs it, then makes the change, then
writes the outcome. The current state is a fold over the lines. An intent without an outcome (a
crash in between) counts as possibly applied: restoring an original is safe even if the change never
happened. A second step of the same kind on the same process (nice 10, then 15) reuses the entry:
the very first original is kept, the applied value is updated.

A torn last line (a crash mid-write) is dropped with a warning; its intent was never acted on,
or its outcome is simply unknown, which the fold already treats as possibly applied. A write or
fsync that fails (ENOSPC, EIO) is cut back to the last good offset before the error is raised, so
the next record never lands glued onto a partial line; until that cut succeeds the journal refuses
to write. A line that an older version left glued (partial bytes, then a whole record) is read
back from the whole record. A file holding only closed entries is compacted on open (new file,
fsync, rename), never while a line in it is unreadable: that line may be the intent of a change
still in place. A file that grows long while entries are open (maintain() rewriting the record of a
process that churns threads) is compacted the same way while open: to the open entries' state, the
records `entry_records` writes, which fold back to the same entries. Nothing but the fold is kept in
memory: records are folded as they are written, and only their count stays (for `order`). One
process at a time may write: an flock on <path>.lock, so `remediator revert` cannot race the daemon.

Every intent carries the boot id (/proc/sys/kernel/random/boot_id): after a reboot, (pid, start
time) can name a new process, so an entry from another boot is never applied to anything
(`from_previous_boot`). Entries written before boot ids were recorded are judged by their time:
written before this boot began means a previous boot.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import RemediatorError
from .procfs import Boot, ProcessIdentity, current_boot
from .trustedfs import Trust, TrustedDirectory, read_all, read_bytes, write_durably

log = logging.getLogger(__name__)

DEFAULT_JOURNAL_PATH = "/var/lib/remediator/journal.jsonl"
FORMAT_VERSION = 1
OPS = ("intent", "applied", "failed", "restored", "dropped")
# An open journal is compacted once it holds this many bytes and COMPACT_GROWTH times what its last
# compaction left: its size stays bounded by what the open entries hold, and each rewrite (of the
# open entries only) is paid for by the growth before it.
COMPACT_AT_BYTES = 1 << 20
COMPACT_GROWTH = 4

OPEN_STATES = ("pending", "applied")  # pending: intent written, outcome unknown (possibly applied)
CLOSED_STATES = ("failed", "restored", "dropped")


class JournalError(RemediatorError):
    pass


@dataclass(frozen=True)
class JournalEntry:
    """One change to one process, folded from its lines."""

    entry_id: str
    identity: ProcessIdentity
    kind: str
    policy: str
    step_index: int
    original: dict  # the value before the very first step: what restore puts back
    target: dict  # what the latest step asked for (what apply would have recorded)
    applied: dict | None  # what is in place after the latest successful step
    state: str  # one of OPEN_STATES or CLOSED_STATES
    since: float  # wall-clock time of the first intent
    updated: float
    evidence: dict = field(default_factory=dict)
    order: int = 0  # grows with the position of the first intent in the file: restore goes newest first
    boot_id: str = ""  # the boot the change was made in ("" in entries older than boot ids)

    @property
    def active(self) -> bool:
        return self.state in OPEN_STATES

    def to_json(self) -> dict:
        return {
            "entry": self.entry_id,
            "pid": self.identity.pid,
            "start_time": self.identity.start_time,
            "kind": self.kind,
            "policy": self.policy,
            "step": self.step_index,
            "original": self.original,
            "target": self.target,
            "applied": self.applied,
            "state": self.state,
            "since": self.since,
            "updated": self.updated,
            "boot_id": self.boot_id,
        }


def fold(records: Iterable[dict]) -> dict[str, JournalEntry]:
    """The state of every entry after applying the records in order. Pure; unknown ops are ignored."""
    return _fold_counting(records)[0]


def _fold_counting(records: Iterable[dict]) -> tuple[dict[str, JournalEntry], int]:
    """fold(), and how many records it could not use: malformed ones, and ops this version does not
    know (a newer version's). A compaction would lose them, so it does not run while there are any."""
    entries: dict[str, JournalEntry] = {}
    ignored = 0
    for order, record in enumerate(records):
        if record.get("op") not in OPS:
            ignored += 1
            continue
        try:
            apply_record(entries, record, order)
        except (KeyError, TypeError, ValueError) as exc:
            ignored += 1
            log.warning("journal: ignoring a malformed %r record (%s: %s)", record.get("op"), type(exc).__name__, exc)
    return entries, ignored


def intent_record(entry_id: str, identity: ProcessIdentity, kind: str, *, policy: str, step_index: int, original: dict,
                  target: dict, evidence: dict, boot_id: str) -> dict:
    """An intent's fields (the journal adds "v" and "time"): written before a change, and written
    again for each open entry by a compaction (entry_records), so both carry every field."""
    return {
        "op": "intent",
        "entry": entry_id,
        "pid": identity.pid,
        "start_time": identity.start_time,
        "kind": kind,
        "policy": policy,
        "step": step_index,
        "original": original,
        "target": target,
        "evidence": evidence,
        "boot_id": boot_id,
    }


def entry_records(entry: JournalEntry) -> list[dict]:
    """Records that fold back to `entry` (an open one), for a compacted file: its intent with the
    first original, then what is in place, then the latest intent again while its outcome is
    unknown. Only `updated` of a pending entry without an applied step reads back as `since`."""
    intent = {
        "v": FORMAT_VERSION,
        "time": entry.since,
        **intent_record(entry.entry_id, entry.identity, entry.kind, policy=entry.policy, step_index=entry.step_index,
                        original=entry.original, target=entry.target, evidence=entry.evidence, boot_id=entry.boot_id),
    }
    records = [intent]
    if entry.applied is not None:
        records.append({"v": FORMAT_VERSION, "time": entry.updated, "op": "applied", "entry": entry.entry_id, "applied": entry.applied})
        if entry.state == "pending":
            records.append({**intent, "time": entry.updated})
    return records


def _line(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()


def apply_record(entries: dict[str, JournalEntry], record: dict, order: int) -> None:
    """Fold one record into `entries` (in place)."""
    entry_id = record.get("entry")
    op = record.get("op")
    if not isinstance(entry_id, str):
        return
    entry = entries.get(entry_id)
    when = float(record.get("time", 0.0))
    if op == "intent":
        if entry is None:
            entries[entry_id] = JournalEntry(
                entry_id=entry_id,
                identity=ProcessIdentity(int(record["pid"]), int(record["start_time"])),
                kind=str(record["kind"]),
                policy=str(record.get("policy", "")),
                step_index=int(record.get("step", 0)),
                original=record["original"],
                target=record.get("target") or {},
                applied=None,
                state="pending",
                since=when,
                updated=when,
                evidence=record.get("evidence") or {},
                order=order,
                boot_id=str(record.get("boot_id") or ""),
            )
        else:
            # A further step: the first original stays, whatever this record repeats.
            entries[entry_id] = dataclasses.replace(
                entry,
                policy=str(record.get("policy", entry.policy)),
                step_index=int(record.get("step", entry.step_index)),
                target=record.get("target") or {},
                state="pending",
                updated=when,
                evidence=record.get("evidence") or entry.evidence,
            )
        return
    if entry is None:
        return  # an outcome for an entry compacted away or never written: nothing to do
    if op == "applied":
        entries[entry_id] = dataclasses.replace(entry, applied=record.get("applied") or {}, state="applied", updated=when)
    elif op == "failed":
        if record.get("left_changed"):
            state = "pending"  # part of the change may be in place: keep it for restore
        elif entry.applied is not None:
            state = "applied"  # a further step failed cleanly: the previous step still holds
        else:
            state = "failed"
        entries[entry_id] = dataclasses.replace(entry, state=state, updated=when)
    elif op in ("restored", "dropped"):
        entries[entry_id] = dataclasses.replace(entry, state=op, updated=when)


@dataclass
class JournalScan:
    """What a journal file holds: its records, where its complete lines end, what could not be read."""

    records: list[dict]
    complete: int  # byte length of the complete lines
    warnings: list[str]
    unreadable: list[int]  # line numbers that could not be read (nor salvaged)


def _salvage(raw: bytes) -> dict | None:
    """A whole record glued after partial bytes (an older version's short write), or None."""
    start = raw.find(b'{"', 1)
    while start > 0:
        try:
            record = json.loads(raw[start:])
        except ValueError:
            record = None
        if isinstance(record, dict) and "op" in record and "entry" in record:
            return record
        start = raw.find(b'{"', start + 1)
    return None


def scan(path: str | Path, trust: Trust | None = None) -> JournalScan:
    """Read a journal file; no locking. Through trustedfs: every line becomes a syscall on some
    process, so a privileged reader refuses a journal (or a directory on its path) others could change."""
    return scan_bytes(read_bytes(path, trust), path)


def scan_bytes(data: bytes, path: str | Path) -> JournalScan:
    records: list[dict] = []
    warnings: list[str] = []
    unreadable: list[int] = []
    complete = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if complete < len(data):
        warnings.append(
            f"{path}: ignoring a torn last line ({len(data) - complete} bytes, a write cut short by a crash)"
        )
    for number, raw in enumerate(data[:complete].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            salvaged = _salvage(raw)
            if salvaged is not None:
                warnings.append(f"{path}:{number}: read a record glued onto a partial write (partial bytes dropped)")
                records.append(salvaged)
                continue
            warnings.append(f"{path}:{number}: ignoring an unreadable line ({exc})")
            unreadable.append(number)
            continue
        records.append(record)
    return JournalScan(records, complete, warnings, unreadable)


def read_records(path: str | Path, trust: Trust | None = None) -> tuple[list[dict], int, list[str]]:
    """(records, byte length of the complete lines, warnings) from a journal file; no locking."""
    found = scan(path, trust)
    return found.records, found.complete, found.warnings


def load_entries(path: str | Path) -> list[JournalEntry]:
    """Every entry in a journal file, read-only and without locking (for status views)."""
    if not Path(path).exists():
        return []
    records, _, warnings = read_records(path)
    for warning in warnings:
        log.warning("%s", warning)
    return sorted(fold(records).values(), key=lambda entry: entry.order)


class Journal:
    """The journal file of one remediator: append-only, fsync'd, locked against a second writer."""

    def __init__(
        self,
        path: str | Path = DEFAULT_JOURNAL_PATH,
        *,
        clock=time.time,
        read_only: bool = False,
        boot: Boot | None = None,
        trust: Trust | None = None,
    ):
        """Open (creating it and its 0700 parents if needed) and lock the journal. Every file is
        opened through trustedfs (`trust` defaults to this process's: checked when privileged).

        read_only: just fold what is there (a missing file is empty): no lock, no compaction, no
        repair of a torn tail, and every record_* call fails. For dry runs and status views.
        boot: this boot (id and start); read from /proc when not given.
        """
        self.path = Path(path)
        self.clock = clock
        self.read_only = read_only
        self.boot = boot if boot is not None else current_boot()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._unreadable: list[int] = []
        self._cut_back_to: int | None = None  # a failed write left bytes past this offset
        self._dir_unsynced = False  # a compaction renamed a new file in, and the directory's fsync failed
        self._dir: TrustedDirectory | None = None
        self._size = 0  # bytes in the file (its complete lines)
        self._compacted_size = 0  # bytes right after the last compaction (0 before: a long file is compacted at its next record)
        if read_only:
            records, _, warnings = read_records(self.path, trust) if self.path.exists() else ([], 0, [])
            for warning in warnings:
                log.warning("%s", warning)
            self._record_count = len(records)
            self._entries = fold(records)
            return
        # The directory is created 0700 where missing, checked, and held: every file in it is opened
        # through this descriptor, never through a symlink.
        self._dir = TrustedDirectory(self.path.parent, trust, create_mode=0o700, shown=str(self.path))
        try:
            self._lock()
            records = self._load()
            self._record_count = len(records)  # the records themselves are not kept: the fold is the state
            self._entries, self._ignored = _fold_counting(records)
            if records and not any(entry.active for entry in self._entries.values()):
                if self._unreadable:
                    log.warning(
                        "journal %s not compacted: line %s cannot be read and may be the intent of a change "
                        "still in place; restore by hand and remove the line",
                        self.path, ", ".join(map(str, self._unreadable)),
                    )
                else:
                    self._compact()
            self._open_for_append()
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> TrustedDirectory | None:
        """The journal's directory, checked and held open while the journal is (None: read-only):
        the engine state is written beside the journal through it."""
        return self._dir

    # -- opening ------------------------------------------------------------------------------
    def _lock(self) -> None:
        assert self._dir is not None
        lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd = self._dir.open(lock_path.name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(
                    f"journal {self.path} is in use by another remediator process (the daemon?): stop it first"
                ) from None
            raise JournalError(f"cannot lock {lock_path}: {exc.strerror}") from None

    def _load(self) -> list[dict]:
        assert self._dir is not None
        if not self._dir.exists(self.path.name):
            return []
        fd = self._dir.open(self.path.name, os.O_RDWR)
        try:
            data = read_all(fd)
            found = scan_bytes(data, self.path)
            records, complete = found.records, found.complete
            self._size = complete
            self._unreadable = found.unreadable
            for warning in found.warnings:
                log.warning("%s", warning)
            if complete < len(data):
                # Cut the torn tail off, or the next record would be glued to it.
                os.ftruncate(fd, complete)
                os.fsync(fd)
        finally:
            os.close(fd)
        return records

    def _compact(self) -> None:
        """Only closed entries: replace the file with an empty one, atomically (or leave it as it is)."""
        assert self._dir is not None
        try:
            self._dir.replace(self.path.name, b"")
        except OSError as exc:
            # Only closed entries: the file is merely longer than it needs to be.
            log.warning("journal %s not compacted: %s", self.path, exc.strerror or exc)
            return
        log.debug("journal %s compacted (%d closed records dropped)", self.path, self._record_count)
        self._record_count = 0
        self._size = 0
        self._entries = {}

    def _compact_open(self) -> None:
        """Rewrite a grown file to the open entries' state (entry_records): a new file written and
        fsync'd, renamed into place, the directory fsync'd. Not while a line cannot be read or a
        record is not understood (it may be the intent of a change still in place). Failing leaves
        the file as it is, only longer: retried once it has grown COMPACT_GROWTH times again."""
        assert self._dir is not None and self._fd is not None
        self._compacted_size = self._size
        if self._unreadable or self._ignored:
            log.warning(
                "journal %s (%d bytes) not compacted: %s cannot be read, and may be the intent of a change still in place",
                self.path, self._size,
                f"line {', '.join(map(str, self._unreadable))}" if self._unreadable else f"{self._ignored} record(s)",
            )
            return
        active = [entry for entry in self.entries() if entry.active]
        data = b"".join(_line(record) for entry in active for record in entry_records(entry))
        temporary = self.path.name + ".compact"
        fd: int | None = None
        try:
            fd = self._dir.open(temporary, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            write_durably(fd, data)
            self._dir.rename(temporary, self.path.name)
        except OSError as exc:
            log.warning("journal %s not compacted: %s", self.path, exc.strerror or exc)
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(temporary, dir_fd=self._dir.fd)
            except OSError:
                pass
            return
        # The new file is the journal from here on. Until the directory is fsync'd a crash may bring
        # the old name back (complete, the same state), but not what is appended to the new one:
        # _append fsyncs the directory first.
        old, self._fd = self._fd, fd
        try:
            os.close(old)
        except OSError:
            pass  # the old file is replaced: nothing of it is needed
        self._dir_unsynced = True
        try:
            self._sync_dir()
        except OSError as exc:
            log.warning("journal %s: compacted, but the directory cannot be fsync'd yet: %s", self.path, exc.strerror or exc)
        # The same open entries (the same objects: callers may hold them); `order` keeps growing.
        self._entries = {entry.entry_id: entry for entry in active}
        log.debug("journal %s compacted while open: %d bytes to %d", self.path, self._size, len(data))
        self._size = self._compacted_size = len(data)

    def _sync_dir(self) -> None:
        assert self._dir is not None
        if self._dir_unsynced:
            self._dir.fsync()
            self._dir_unsynced = False

    def _open_for_append(self) -> None:
        assert self._dir is not None
        created = not self._dir.exists(self.path.name)
        self._fd = self._dir.open(self.path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            os.fchmod(self._fd, 0o600)  # whatever the umask: readable and writable by root only
            self._dir.fsync()  # the new name must survive a crash too

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def _append(self, record: dict) -> JournalEntry:
        """Write and fsync one record, fold it in, and return its entry as folded (a compaction
        that follows may leave a closed entry out of the journal's state)."""
        if self.read_only:
            raise JournalError(f"journal {self.path} was opened read-only")
        if self._fd is None:
            raise JournalError(f"journal {self.path} is closed")
        record = {"v": FORMAT_VERSION, "time": self.clock(), **record}
        line = _line(record)
        if self._cut_back_to is not None:
            self._cut_back(self._cut_back_to)  # an earlier failed write: its bytes must go first
        self._sync_dir()  # a compacted file's name must be durable before a record in it counts
        good = os.fstat(self._fd).st_size  # we hold the lock: nobody else appends
        try:
            write_durably(self._fd, line)
        except OSError as exc:
            # A short write (ENOSPC) leaves a partial line; a failed fsync (EIO) leaves a line the
            # disk may not hold. Either way the record does not count: cut back to the last good
            # offset, or the next record would be glued onto the partial one and lost on reading.
            try:
                self._cut_back(good)
            except OSError as cut_exc:
                log.error(
                    "journal %s: cannot cut a failed write back to offset %d (%s): no record is written until it can",
                    self.path, good, cut_exc.strerror or cut_exc,
                )
            raise exc
        apply_record(self._entries, record, self._record_count)
        self._record_count += 1
        self._size = good + len(line)
        entry = self._entries[record["entry"]]
        if self._size >= max(COMPACT_AT_BYTES, COMPACT_GROWTH * self._compacted_size):
            self._compact_open()
        return entry

    def _cut_back(self, offset: int) -> None:
        self._cut_back_to = offset
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self._cut_back_to = None

    def record_intent(
        self,
        identity: ProcessIdentity,
        kind: str,
        *,
        policy: str,
        step_index: int,
        original: dict,
        target: dict,
        evidence: dict | None = None,
    ) -> JournalEntry:
        """Write (and fsync) the original before a change. An active entry of the same kind keeps its original."""
        existing = self.find(identity, kind)
        entry_id = existing.entry_id if existing else uuid.uuid4().hex[:16]
        return self._append(
            intent_record(entry_id, identity, kind, policy=policy, step_index=step_index,
                          original=existing.original if existing else original, target=target, evidence=evidence or {},
                          boot_id=self.boot.boot_id)
        )

    def record_applied(self, entry: JournalEntry, applied: dict) -> JournalEntry:
        return self._append({"op": "applied", "entry": entry.entry_id, "applied": applied})

    def record_failed(self, entry: JournalEntry, reason: str, *, left_changed: bool = False) -> JournalEntry:
        return self._append({"op": "failed", "entry": entry.entry_id, "reason": reason, "left_changed": left_changed})

    def record_restored(self, entry: JournalEntry, detail: str = "") -> JournalEntry:
        return self._append({"op": "restored", "entry": entry.entry_id, "detail": detail})

    def record_dropped(self, entry: JournalEntry, reason: str) -> JournalEntry:
        return self._append({"op": "dropped", "entry": entry.entry_id, "reason": reason})

    # -- reading ------------------------------------------------------------------------------
    def entries(self) -> list[JournalEntry]:
        return sorted(self._entries.values(), key=lambda entry: entry.order)

    def active(self) -> list[JournalEntry]:
        """Entries whose change is (or may be) in place, oldest first."""
        return [entry for entry in self.entries() if entry.active]

    def find(self, identity: ProcessIdentity, kind: str) -> JournalEntry | None:
        """The active entry of this process and kind; one from a previous boot is another process."""
        for entry in self.active():
            if entry.identity == identity and entry.kind == kind and not self.from_previous_boot(entry):
                return entry
        return None

    def from_previous_boot(self, entry: JournalEntry) -> bool:
        """Was the change made before this boot (so its process is gone, whatever holds the pid now)?

        Entries without a boot id (written before intents recorded one) count as from a
        previous boot when they were written before this boot began. Within one boot the start time
        tells a reused pid apart; across a reboot it does not (an early service can get the same
        pid and start time again), hence the boot id.
        """
        if entry.boot_id and self.boot.boot_id:
            return entry.boot_id != self.boot.boot_id
        return bool(self.boot.started_at) and entry.since < self.boot.started_at

    def get(self, entry_id: str) -> JournalEntry | None:
        return self._entries.get(entry_id)
