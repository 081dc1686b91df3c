"""What every actuator shares: the syscall object, the typed failures, plans and results.

An actuator owns one kernel knob. The executor drives it in a fixed order:

    current = actuator.read(pid)                    # reads only
    plan = actuator.plan(identity, target, current, original=..., applied=...)  # reads only; the exact change
    result = actuator.apply(plan)                   # the change (the dry-run twin changes nothing)
    actuator.restore(identity, original, applied, planned)  # back to the original, where still ours
    actuator.maintain(identity, original, applied, known_tids, noticed)  # threads created since

Never worse: a step only ever lowers what the process gets (nice only up, a mask or a unit's
AllowedCPUs never wider, see `nice.weaker_nice` and `affinity.narrowed_mask`), and a restore or a
maintain only touches a value that is still the one remediator set; what someone else changed
since is left as it is, and the outcome says so (`RestoreResult.left`).

Failures are typed so the executor turns them into outcomes without guessing: `ProcessGone` (the
process left: ordinary), `ChangeDenied` (EPERM/EACCES), `ChangeInvalid` (EINVAL or a target that
cannot work), `ChangeFailed` (anything else). A change that fails half-way is rolled back to what
was read just before it; `left_changed` says when even that failed, so the journal keeps the entry.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Protocol, TypeVar

from ..errors import ProcessGone, RemediatorError
from ..procfs import ProcessIdentity, ProcFS
from ..systemd import SystemdError


class Syscalls:
    """The scheduling syscalls, one method each, so tests can record calls and inject errno values."""

    def getpriority(self, tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    def setpriority(self, tid: int, value: int) -> None:
        os.setpriority(os.PRIO_PROCESS, tid, value)

    def sched_getaffinity(self, tid: int) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(tid))

    def sched_setaffinity(self, tid: int, cpus: Collection[int]) -> None:
        os.sched_setaffinity(tid, cpus)

    def sched_getscheduler(self, tid: int) -> int:
        """The policy number, SCHED_RESET_ON_FORK included when set."""
        return os.sched_getscheduler(tid)

    def sched_getpriority(self, tid: int) -> int:
        return os.sched_getparam(tid).sched_priority

    def sched_setscheduler(self, tid: int, policy: int, priority: int) -> None:
        os.sched_setscheduler(tid, policy, os.sched_param(priority))


class ActuatorError(RemediatorError):
    """A change (or its undo) that did not happen, with the reason in one line."""

    status = "failed"

    def __init__(self, message: str, *, left_changed: bool = False, closes_entry: bool = False):
        super().__init__(message)
        self.message = message
        self.left_changed = left_changed  # part of the change is still in place
        self.closes_entry = closes_entry  # a restore that can never succeed (retrying is pointless)


class ChangeDenied(ActuatorError):
    status = "denied"


class ChangeInvalid(ActuatorError):
    status = "invalid"


class ChangeFailed(ActuatorError):
    status = "failed"


ERRNO_NAMES = {errno.EPERM: "EPERM", errno.EACCES: "EACCES", errno.EINVAL: "EINVAL", errno.EBUSY: "EBUSY", errno.ESRCH: "ESRCH"}


def systemd_call(call, consequence: str = "nothing changed"):
    """A call to systemd, its error as ours: denied (access) or failed, saying what it leaves."""
    try:
        return call()
    except SystemdError as exc:
        raise (ChangeDenied if exc.denied else ChangeFailed)(f"{exc}: {consequence}") from None


def errno_name(exc: OSError) -> str:
    return ERRNO_NAMES.get(exc.errno, errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def typed_change_error(exc: OSError, message: str) -> ActuatorError:
    """The one place where a failed change's errno becomes its outcome: EPERM/EACCES denied,
    EINVAL invalid, anything else failed (ESRCH is the caller's: it needs the identity)."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return ChangeDenied(message)
    if exc.errno == errno.EINVAL:
        return ChangeInvalid(message)
    return ChangeFailed(message)


def change_error(exc: OSError, call: str, explanation: str = "") -> ActuatorError:
    """A failed syscall on a thread as a typed error."""
    text = f"{call} failed with {errno_name(exc)} ({exc.strerror or exc})"
    if explanation:
        text += f": {explanation}"
    return typed_change_error(exc, text)


@dataclass(frozen=True)
class Plan:
    """A change worked out from what was read just now; `description` is the exact change."""

    kind: str
    identity: ProcessIdentity
    current: dict  # JSON-friendly state read just before; the original when nothing is active yet
    target: dict  # JSON-friendly: {"nice": 10}, {"cpus": [1]}, {"cgroup": "...", "cpus": [1]}
    description: str
    unchanged: bool = False
    threads: int = 0
    details: dict = field(default_factory=dict)  # the actuator's own working data
    expected: dict = field(default_factory=dict)  # what apply will record as applied (journalled with the intent)
    # Other processes the change reaches (a unit's property reaches all of its processes): the
    # executor refuses the change when one of them is off limits.
    affects: tuple[int, ...] = ()
    # True when they share a group someone else made (a systemd unit), not one of remediator's own
    # (whose members one policy placed): then each must also run as the offender's user.
    affects_foreign_group: bool = False


@dataclass(frozen=True)
class ApplyResult:
    applied: dict  # JSON-friendly: what is now in place (journalled as the applied value)
    message: str
    threads: int = 0
    performed: bool = True  # False for a dry-run twin: nothing was changed


@dataclass(frozen=True)
class MaintainResult:
    message: str
    threads: int
    # What is in place now, when maintain() changed something the journal must know about (the
    # values set on new threads, so a restart does not take them for new again); None: nothing to write.
    applied: dict | None = None
    status: str = "applied"  # "left-changed-by-other": it only noticed values someone else set


@dataclass(frozen=True)
class RestoreResult:
    message: str
    restored: bool = True  # False: nothing was put back (everything was changed by someone else since)
    # What was left because someone else changed it after remediator (JSON-friendly, for the audit):
    # {"threads": {tid: {"now": v, "set": v}}} or {"unit": ..., "now": ..., "set": ...}.
    left: dict | None = None


class Actuator(Protocol):
    kind: str

    def read(self, pid: int) -> dict: ...

    def plan(
        self, identity: ProcessIdentity, target: dict, current: dict, *, original: dict | None = None, applied: dict | None = None
    ) -> Plan: ...

    def apply(self, plan: Plan) -> ApplyResult: ...

    def restore(
        self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None
    ) -> RestoreResult: ...

    def maintain(
        self, identity: ProcessIdentity, original: dict, applied: dict, known_tids: set[int], noticed: set[int] | None = None,
        *, journalled: dict | None = None,
    ) -> MaintainResult | None:
        """Keep the change on threads born since. `journalled`: the record on disk, given while the
        executor holds back this round's record (actuators/threads.py); one with no per-thread
        record takes it and ignores it."""
        ...

    def cleanup(self, original: dict, applied: dict | None) -> str: ...


class DryRun:
    """The dry-run twin of an actuator: reads for real, plans for real, changes nothing.

    It never calls the real actuator's apply/restore/maintain, so no change can leak through.
    """

    def __init__(self, actuator: Actuator):
        self.actuator = actuator
        self.kind = actuator.kind

    def read(self, pid: int) -> dict:
        return self.actuator.read(pid)

    def plan(
        self, identity: ProcessIdentity, target: dict, current: dict, *, original: dict | None = None, applied: dict | None = None
    ) -> Plan:
        return self.actuator.plan(identity, target, current, original=original, applied=applied)

    def apply(self, plan: Plan) -> ApplyResult:
        return ApplyResult(applied=dict(plan.target), message=plan.description, threads=plan.threads, performed=False)

    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None) -> RestoreResult:
        raise RemediatorError("dry run: nothing was changed, so nothing is restored")

    def maintain(
        self, identity: ProcessIdentity, original: dict, applied: dict, known_tids: set[int], noticed: set[int] | None = None,
        *, journalled: dict | None = None,
    ) -> None:
        return None

    def cleanup(self, original: dict, applied: dict | None) -> str:
        return ""


# -- per-thread helpers shared by nice and affinity ------------------------------------------------

T = TypeVar("T")


def thread_values(procfs: ProcFS, pid: int, read: Callable[[int], T]) -> tuple[dict[int, T], T]:
    """Read a per-thread value for every thread; returns (by tid, the main thread's value).

    A thread that exits while we read is skipped; the process leaving raises ProcessGone.
    """
    values: dict[int, T] = {}
    for tid in sorted(procfs.tids(pid)):
        try:
            values[tid] = read(tid)
        except ProcessLookupError:
            continue
        except OSError as exc:
            raise change_error(exc, f"read thread {tid} of pid {pid}") from None
    if pid not in values:
        raise ProcessGone(pid)
    return values, values[pid]


def ensure_alive(procfs: ProcFS, identity: ProcessIdentity) -> None:
    """Raise ProcessGone when the process left or its pid now names another process."""
    procfs.verify(identity)


def group_counts(values: Iterable[str]) -> str:
    """'0 on 2 threads, 3 on 1' from ['0', '0', '3'] (a single value is just '0')."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{value} on {count} thread{'s' if count != 1 else ''}" for value, count in ordered)


def plural_threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def tid_map_from_json(data: dict) -> dict[int, object]:
    return {int(tid): value for tid, value in data.items()}


def tid_map_to_json(values: dict[int, object]) -> dict[str, object]:
    return {str(tid): value for tid, value in sorted(values.items())}
