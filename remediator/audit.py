"""The audit log: one JSON line per decision, live or dry-run, with its evidence and outcome.

Lines are appended and flushed as they happen; `remediator audit` prints them as a table. A line
carries: time, mode, decision kind, policy (with file:line), process (pid, start time, comm,
cmdline), evidence (protected tail and threshold, offender CPU and blame share), the step, the
exact change (or the reason nothing changed), the outcome, and for verifications the before/after.
The daemon's lines also carry its sample source ("bpf" or "procfs", the latter with "degraded").
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .culprits import CulpritSettings, CulpritState, self_inflicted_tail, unnamed_culprits
from .engine import Decision
from .errors import RemediatorError
from .model import Outcome
from .jsonlines import read_json_lines
from .printable import printable
from .procfs import ProcessIdentity, shown_cmdline
from .trustedfs import Trust, TrustedDirectory


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def event_record(ts: float, mode: str, fields: dict) -> dict:
    """An audit line that is no engine decision (an unnamed culprit, a self-inflicted tail), stamped like the others."""
    return {"ts": _iso(ts), "epoch": round(ts, 3), "mode": mode, **fields}


def audit_record(decision: Decision, outcome: Outcome | None, mode: str) -> dict:
    info = decision.info
    record = {
        "ts": _iso(decision.ts),
        "epoch": round(decision.ts, 3),
        "mode": mode,
        "decision": decision.kind,
        "action_id": decision.action_id,
        "policy": None
        if decision.policy is None
        else {"name": decision.policy.name, "location": str(decision.policy.location)},
        "process": {
            "pid": info.pid,
            "start_time": info.start_time,
            "comm": info.comm,
            "cmdline": shown_cmdline(info.cmdline),
        },
        "message": decision.message,
        "evidence": dict(decision.evidence),
    }
    if decision.kind == "verify" and mode != "live":
        # Nothing was changed: before/after compares two periods, not the effect of a change.
        record["evidence"]["note"] = f"{mode}: nothing was changed, so this only compares the periods before and after"
    if decision.step is not None:
        record["step"] = {
            "index": decision.step_index,
            "action": decision.step.describe(),
            "settle_s": decision.step.settle_s,
            "location": str(decision.step.location),
        }
    if outcome is not None:
        record["outcome"] = outcome.status
        record["change"] = outcome.message
        if outcome.original is not None:
            record["original"] = outcome.original
        if outcome.threads:
            record["threads"] = outcome.threads
        if outcome.changed_at is not None:
            # `epoch` is when the engine decided; this is when the change was in place.
            record["changed_epoch"] = round(outcome.changed_at, 3)
        if outcome.left:
            # What remediator had set and someone else changed since: left as they set it.
            record["left_changed_by_other"] = outcome.left
    return record


def outcome_record(when: str, outcome: Outcome, mode: str, folded: int = 0) -> dict:
    """A change the executor made or gave back outside a decision: re-applied to a new thread
    ("maintain"), or restored at start-up, exit or a mode change. `folded`: how many more outcomes
    like it since the process's last such line this one stands for (AuditWriter)."""
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "epoch": round(time.time(), 3), "mode": mode,
              "decision": when, "process": {"pid": outcome.identity.pid, "start_time": outcome.identity.start_time},
              "outcome": outcome.status, "change": outcome.message}
    if folded:
        record["folded"] = folded
    return record


# A process that keeps making threads under a per-thread change gets a "maintain" outcome every
# tick: at most one line per process and outcome in this time, the rest folded into the next.
MAINTAIN_LINE_EVERY_S = 60.0
# Outcomes that end an entry: always written at once, and they end the process's fold.
ENDING_STATUSES = frozenset({"gone", "dropped", "restored"})


@dataclass
class _Fold:
    written_at: float  # when the last line for this process and outcome was written
    count: int = 0  # outcomes since, not written
    last: tuple[Outcome, str] | None = None  # the newest of them, with its mode


# (when, outcome, mode, folded): one line to write; `folded` counts the outcomes like it since the
# process's previous such line that were not written.
Line = tuple[str, Outcome, str, int]


class MaintainFold:
    """Which outcomes outside decisions get a line (audit and daemon log alike): all but
    "unchanged", but "maintain" outcomes at most once per process, kind and status every
    MAINTAIN_LINE_EVERY_S. A process making threads all day (or a hostile user's, made to) must not
    fill the disk, nor push the daemon's other messages past journald's rate limit, at a line a
    tick. The others are counted into the next line, written at the first tick after the interval
    or when the process's entry ends. `clock` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._folds: dict[tuple[ProcessIdentity, str, str], _Fold] = {}  # (process, kind, status)

    def outcome(self, when: str, outcome: Outcome, mode: str) -> list[Line]:
        """The lines to write now for this outcome."""
        if outcome.status == "unchanged":
            return []
        if when != "maintain" or outcome.status in ENDING_STATUSES:
            return [*self._end(outcome.identity), (when, outcome, mode, 0)]
        key = (outcome.identity, outcome.kind, outcome.status)
        fold, now = self._folds.get(key), self.clock()
        if fold is not None and 0 <= now - fold.written_at < MAINTAIN_LINE_EVERY_S:
            fold.count += 1
            fold.last = (outcome, mode)
            return []
        self._folds[key] = _Fold(now)
        return [(when, outcome, mode, fold.count if fold is not None else 0)]

    def tick(self) -> list[Line]:
        """The folded lines whose interval is over."""
        now, lines = self.clock(), []
        for key, fold in list(self._folds.items()):
            if 0 <= now - fold.written_at < MAINTAIN_LINE_EVERY_S:
                continue
            if fold.last is None:
                del self._folds[key]  # quiet for a whole interval: the next outcome is written at once
                continue
            lines.append(("maintain", *fold.last, fold.count - 1))
            self._folds[key] = _Fold(now)
        return lines

    def _end(self, identity: ProcessIdentity) -> list[Line]:
        """What is folded for a process whose entry ends, so that its count is not lost."""
        lines = []
        for key in [key for key in self._folds if key[0] == identity]:
            fold = self._folds.pop(key)
            if fold.last is not None:
                lines.append(("maintain", *fold.last, fold.count - 1))
        return lines


def folded_text(folded: int) -> str:
    return f" (and {folded} more like it since the last line)" if folded else ""


class AuditWriter:
    """The tick's audit observer: one line per decision, and one per outcome that changed something
    (maintain outcomes folded, see MaintainFold). `sink` takes a record (AuditLog.write, or a list's
    append for replay); `clock` is monotonic seconds."""

    def __init__(self, sink: Callable[[dict], object], clock: Callable[[], float] = time.monotonic):
        self.sink = sink
        self.fold = MaintainFold(clock)

    def on_decision(self, carried) -> None:
        self.sink(audit_record(carried.decision, carried.outcome, carried.mode))

    def on_outcome(self, when: str, outcome: Outcome, mode: str) -> None:
        for line in self.fold.outcome(when, outcome, mode):
            self.sink(outcome_record(*line))

    def on_tick(self, report) -> None:
        for line in self.fold.tick():
            self.sink(outcome_record(*line))


class CulpritWriter:
    """The tick's observer for unnamed culprits and self-inflicted tails (culprits.py): their audit
    lines, bounded as that module says, for the daemon and replay alike. `sink` takes a record."""

    def __init__(self, sink: Callable[[dict], object], settings: CulpritSettings = CulpritSettings()):
        self.sink = sink
        self.settings = settings
        self.state = CulpritState()
        self.decisions: list[Decision] = []  # the engine's since the last tick (the tick's, and bursts' between)

    def on_decision(self, carried) -> None:
        self.decisions.append(carried.decision)

    def on_outcome(self, when: str, outcome: Outcome, mode: str) -> None:
        pass

    def on_tick(self, report) -> None:
        sample, now = report.sample, report.sample.end_ns / 1e9
        decisions, self.decisions = self.decisions, []
        culprits, self.state = unnamed_culprits(sample, report.policies, self.state, now, self.settings,
                                                daemon=report.settings.daemon)
        own, self.state = self_inflicted_tail(sample, report.policies, self.state, now, self.settings, decisions)
        for record in culprits + own:
            self.sink(event_record(sample.ts, report.mode, record))


class AuditLog:
    """Appends audit lines to a file (created 0640, and its missing directories 0750). `stamp` holds fields
    added to every line (the daemon's source, and "degraded" when it cannot see a tail or blame).

    A write that fails (ENOSPC, EIO, EDQUOT) is counted in `failures` (by errno name) and never
    raised: the daemon must keep guarding the service when its disk is full, and it says so in its
    summary and status instead. A line cut short is cut off again, so the file stays one JSON
    object per line for `remediator audit`.
    """

    def __init__(self, path: str | Path, stamp: dict | None = None, trust: Trust | None = None):
        self.path = Path(path)
        self.stamp = dict(stamp or {})
        self.failures: dict[str, int] = {}
        self.last_failure = ""
        try:
            # Through trustedfs (checked when privileged): never through a symlink, nor in a directory
            # someone else could swap.
            with TrustedDirectory(self.path.parent, trust, create_mode=0o750, shown=str(self.path)) as directory:
                self._fd: int | None = directory.open(self.path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise RemediatorError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from None

    def write(self, record: dict) -> bool:
        """Append one line; False (and counted) when the file system refused it."""
        if self._fd is None:
            return False
        line = (json.dumps({**record, **self.stamp}, separators=(",", ":"), default=str) + "\n").encode()
        size = None
        try:
            size = os.fstat(self._fd).st_size
            written = os.write(self._fd, line)  # one write(2) per line: no buffer to replay a failure later
            if written != len(line):
                # the file system took part of the line: as full as a refusal (a torn line is cut off below)
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write: {written} of {len(line)} bytes)")
            return True
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"
            self.failures[name] = self.failures.get(name, 0) + 1
            self.last_failure = f"{self.path}: {exc.strerror or exc}"
            if size is not None:
                try:
                    os.ftruncate(self._fd, size)  # drop a torn line (freeing space works on a full fs)
                except OSError:
                    pass
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit(path: str | Path) -> Iterator[dict]:
    for number, record in read_json_lines(path, "an audit line"):
        if not isinstance(record, dict):
            raise RemediatorError(f"{path}:{number}: not an audit line: a JSON object was expected")
        yield record


def decision_detail(record: dict) -> str:
    evidence = record.get("evidence") or {}
    kind = record.get("decision")
    if kind == "verify":
        before, after = evidence.get("before") or {}, evidence.get("after") or {}
        rates = ""
        if before and after:
            low, high = evidence.get("rate_ratio_interval") or (None, None)
            rates = (f", over {evidence.get('threshold_us')} us {before.get('over')}/{before.get('waits')} -> "
                     f"{after.get('over')}/{after.get('waits')} (x{evidence.get('rate_ratio')}, {low}-{high})")
        text = (
            f"{evidence.get('verdict')}: p{evidence.get('percentile'):g} {evidence.get('before_tail_us')} -> "
            f"{evidence.get('after_tail_us')} us{rates}, blame {evidence.get('before_blame_share')} -> "
            f"{evidence.get('after_blame_share')}"
        )
        return text + (" (nothing was changed)" if evidence.get("note") else "")
    tail = evidence.get("protected_tail")
    offender = evidence.get("offender")
    parts = []
    if tail and "waits_over" in tail:  # the burst path: waits counted in the kernel, no percentile
        parts.append(f"burst: {tail.get('waits_over')} waits > {tail.get('threshold_us')} us within {tail.get('span_ms')} ms")
    elif tail and tail.get("percentile") is not None:
        # One tick's tail (an unnamed culprit, a self-inflicted tail) has no trigger windows to count.
        windows = f" ({tail.get('windows_over')}/{tail.get('of_windows')})" if "windows_over" in tail else ""
        parts.append(f"p{tail.get('percentile'):g} {tail.get('value_us')} us > {tail.get('threshold_us')} us{windows}")
    if offender:
        parts.append(f"cpu {offender.get('cpu')} peak {offender.get('peak_cpu')} blame {offender.get('blame_share')}")
    if record.get("change"):
        parts.append(record["change"] + folded_text(record.get("folded") or 0))
    elif record.get("message"):
        parts.append(record["message"])
    return "; ".join(parts)


def format_table(records: list[dict], width: int = 0) -> str:
    rows = [("TIME (UTC)", "MODE", "DECISION", "POLICY", "PID", "COMM", "STEP", "OUTCOME", "DETAIL")]
    for record in records:
        policy = record.get("policy") or {}
        process = record.get("process") or {}
        step = record.get("step") or {}
        cells = (
            str(record.get("ts", ""))[11:23],
            record.get("mode", ""),
            record.get("decision", ""),
            policy.get("name", ""),
            process.get("pid", ""),
            process.get("comm", ""),
            step.get("action", ""),
            record.get("outcome", ""),
            decision_detail(record),
        )
        # The log keeps exact values (JSON); the table shows comm, cmdline and paths escaped: a
        # process must not be able to add a row or drive the reader's terminal.
        rows.append(tuple(printable(str(cell)) for cell in cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1]
        lines.append(line[:width] if width else line)
    return "\n".join(lines)
