"""The executor: the only code that changes processes.

For each request it holds the process (a directory descriptor of /proc/<pid>, see ProcFS.hold)
from the identity check to the end of the change, re-reads it, re-checks its identity (pid, start
time) and the safety rules just before the change (on the parent chain as /proc has it then, so a
worker the protected service forked is refused whatever the engine knew of it), checks that the
policy that asked still governs the process as read then (the engine decides on readings cached
for seconds: an exec, a rename or a dropped privilege since must not be acted on), asks the actuator
for a plan (reads only), writes the original to the journal (fsync), makes the change, and writes
the outcome. Every result is an `Outcome`; a process that left (ESRCH) and a refusal by the kernel
(EPERM, EINVAL) are outcomes too, never exceptions.

In dry-run mode the actuators are their dry-run twins: plans are made from real reads, the outcome
is "would-apply" with the exact change, and nothing is written anywhere (not even the journal).
"""

from __future__ import annotations

import logging
import time
from typing import Collection, Iterable, NamedTuple

from .actuators import KINDS, Actuator, ActuatorError, default_actuators, dry_run_twins
from .cpulist import format_cpulist
from .errors import ProcessGone, RemediatorError
from .journal import Journal, JournalEntry
from .model import LEFT_BY_OTHER, ActionRequest, Outcome, PolicySet
from .procfs import ProcessIdentity, ProcessInfo, ProcFS
from .safety import daemon_identity, exclusion_reason
from .trees import ancestors_read, governing

log = logging.getLogger(__name__)

ON_START_CHOICES = ("restore", "keep")
# An entry from another boot: its process cannot exist any more, whatever holds the pid now.
PREVIOUS_BOOT = "from a previous boot: process gone"
# maintain() journals an entry's record at most this often. A process that churns threads still has
# every new thread changed each tick, but costs at most 6 records a minute, each the size of its
# live threads (threads.PerThreadActuator._live_record), instead of one per tick.
MAINTAIN_JOURNAL_INTERVAL_S = 10.0
# A change that reaches other processes too (a unit's property, a group of ours) checks each of
# them first (off limits, another user): at most this many, or it is refused.
AFFECTED_CHECK_MAX = 1024


class Unjournalled(NamedTuple):
    """A record maintain() made within the interval, not on disk yet."""

    base: dict | None  # the journal's record it was built on: a later step's record replaces both
    record: dict


class Executor:
    def __init__(
        self,
        journal: Journal | None,
        procfs: ProcFS,
        *,
        dry_run: bool,
        actuators: dict[str, Actuator] | None = None,
        self_pid: int | None = None,
    ):
        if journal is None and not dry_run:
            raise ValueError("an executor that changes processes needs a journal")
        self.journal = journal
        self.procfs = procfs
        self.dry_run = dry_run
        actuators = dict(actuators) if actuators is not None else default_actuators(procfs)
        # The dry-run twins can only read: a dry-run executor cannot change a process by mistake.
        self.actuators: dict[str, Actuator] = dry_run_twins(actuators) if dry_run else actuators
        # Remediator's own (pid, start time) in this tree (default: this process): off limits with what it forks.
        self.daemon = daemon_identity(procfs, self_pid)
        self._known_tids: dict[str, set[int]] = {}  # entry id -> threads already handled by maintain()
        self._noticed_tids: dict[str, set[int]] = {}  # entry id -> threads reported as changed by someone else
        self._unjournalled: dict[str, Unjournalled] = {}  # entry id -> maintain()'s record waiting for the interval
        self._journalled_at: dict[str, float] = {}  # entry id -> when maintain() last wrote its record (journal clock)

    # -- apply --------------------------------------------------------------------------------
    def apply(self, request: ActionRequest, protected_pids: Collection[int], policies: PolicySet | None = None) -> Outcome:
        """`policies`: the set the request's policy is in; the change is made only while that
        policy governs the process as read now (the daemon always passes them)."""
        identity, kind = request.identity, request.kind
        if kind not in self.actuators:
            return Outcome("invalid", kind, identity, f"unknown action kind {kind!r} (known: {', '.join(KINDS)})")
        # Held from the identity check to the end of the change: if the process leaves and another
        # takes its pid meanwhile (the journal's fsync sits in this window), every read and thread
        # list through the hold fails as gone instead of naming the newcomer.
        try:
            with self.procfs.hold(identity.pid):
                return self._apply_held(request, protected_pids, policies)
        except ProcessGone as exc:
            return Outcome("gone", kind, identity, str(exc))
        except RemediatorError as exc:
            return Outcome("failed", kind, identity, f"cannot read the process: {exc}")

    def _apply_held(self, request: ActionRequest, protected_pids: Collection[int], policies: PolicySet | None) -> Outcome:
        identity, kind = request.identity, request.kind

        def outcome(status: str, message: str, **extra) -> Outcome:
            return Outcome(status, kind, identity, message, **extra)

        actuator = self.actuators[kind]
        try:
            info = self.procfs.process_info(identity.pid)
        except ProcessGone as exc:
            return outcome("gone", str(exc))
        except RemediatorError as exc:
            return outcome("failed", f"cannot read the process: {exc}")
        if info.identity != identity:
            return outcome("gone", f"pid {identity.pid} was reused (started at {info.start_time}, expected {identity.start_time}): not touched")
        reason = self._exclusion(info, protected_pids)
        if reason:
            return outcome("refused", f"pid {identity.pid} ({info.comm}) is off limits: {reason}")
        if policies is not None:
            reason = self._not_governed_now(info, request.policy, policies)
            if reason:
                return outcome("refused", reason)

        existing = self.journal.find(identity, kind) if self.journal else None
        try:
            current = actuator.read(identity.pid)
            plan = actuator.plan(identity, request.target(), current, **self._earlier(existing))
        except ProcessGone as exc:
            return outcome("gone", str(exc))
        except ActuatorError as exc:
            return outcome(exc.status, exc.message)
        except RemediatorError as exc:
            return outcome("failed", str(exc))
        except OSError as exc:
            return outcome("failed", f"cannot read {exc.filename or 'the current state'}: {exc.strerror or exc}: nothing changed")
        original = existing.original if existing else plan.current
        refusal = self._refuse_affected(plan, info, protected_pids)
        if refusal:
            return outcome("refused", refusal)

        if plan.unchanged:
            return outcome("unchanged", plan.description, original=original, applied=existing.applied if existing else None)
        if self.dry_run:
            result = actuator.apply(plan)
            return outcome("would-apply", result.message, original=original, applied=result.applied, threads=result.threads)

        assert self.journal is not None
        try:
            entry = self.journal.record_intent(
                identity,
                kind,
                policy=request.policy,
                step_index=request.step_index,
                original=plan.current,
                target=plan.expected or plan.target,
                evidence=request.evidence,
            )
        except OSError as exc:
            # The original is not on disk, so the change could never be undone: refuse it.
            return outcome(
                "failed",
                f"cannot make the original durable in the journal {self.journal.path} ({exc.strerror or exc}): "
                "change refused, nothing changed",
            )

        try:
            result = actuator.apply(plan)
            changed_at = time.time()  # the change took effect here; the journal's fsync comes after
        except ProcessGone as exc:
            self._record(self.journal.record_dropped, entry, f"{exc} during the change")
            return outcome("gone", f"{exc} during the change", original=entry.original)
        except ActuatorError as exc:
            self._record(self.journal.record_failed, entry, exc.message, left_changed=exc.left_changed)
            return outcome(exc.status, exc.message, original=entry.original)
        except (OSError, RemediatorError) as exc:
            # Not a refusal the actuator understood: the change may be half made, so the entry stays open.
            message = f"{exc}; the change may be partly in place and stays in the journal for restore"
            self._record(self.journal.record_failed, entry, message, left_changed=True)
            return outcome("failed", message, original=entry.original)
        except BaseException as exc:
            # A bug, not a kernel answer: the change may be half made, so the entry stays open.
            self._record(self.journal.record_failed, entry, f"internal error: {exc!r}", left_changed=True)
            raise

        note = self._record(self.journal.record_applied, entry, result.applied)
        self._known_tids[entry.entry_id] = self._initial_known(entry, result.applied)
        return outcome("applied", result.message + note, original=entry.original, applied=result.applied, threads=result.threads,
                       changed_at=changed_at)

    @staticmethod
    def _earlier(existing: JournalEntry | None) -> dict:
        """What an earlier step of the same kind left, for the plan to compare with (a thread that
        no longer holds it was changed by someone else). {} as applied when that step's outcome is
        unknown (pending): then nothing is compared, and the entry is restored unconditionally."""
        if existing is None:
            return {}
        return {"original": existing.original, "applied": existing.applied if existing.state == "applied" else {}}

    def _refuse_affected(self, plan, offender: ProcessInfo, protected_pids: Collection[int]) -> str | None:
        """Why a change that reaches other processes too (a unit's property) may not be made: one of
        them is off limits, or, in a group remediator did not make, runs as another user. A unit can
        hold several users' processes (cron's and atd's jobs run in its unit when PAM opens no
        session for them): a job calling itself fluent-bit must not get root's cron throttled."""
        if len(plan.affects) > AFFECTED_CHECK_MAX:
            # Each is read in full with its parent chain: a user's session scope of thousands of
            # processes would stall the tick (and the watchdog) for seconds at every attempt.
            return (f"the change reaches {len(plan.affects)} processes, more than the {AFFECTED_CHECK_MAX} remediator "
                    "checks before a change that reaches them all; nothing changed")
        for pid in plan.affects:
            if pid == offender.pid:
                continue
            try:
                info = self.procfs.process_info(pid)
            except RemediatorError:
                continue  # gone meanwhile
            reason = self._exclusion(info, protected_pids)
            if reason:
                return f"the change reaches pid {pid} ({info.comm}) too, which is off limits: {reason}; nothing changed"
            if plan.affects_foreign_group and info.uid != offender.uid:
                return (f"the change reaches pid {pid} ({info.comm}) too, which runs as uid {info.uid}, not as the "
                        f"offender's uid {offender.uid}: a unit-wide change may not reach another user's processes; "
                        "nothing changed")
        return None

    def _exclusion(self, info: ProcessInfo, protected_pids: Collection[int]) -> str | None:
        """safety.exclusion_reason on the parent chain read now, each link checked by start time."""
        return exclusion_reason(info, protected_pids, processes=self.procfs.parent_chain(info), daemon=self.daemon)

    def _not_governed_now(self, info: ProcessInfo, policy: str, policies: PolicySet) -> str | None:
        """Why `policy` does not govern the process as just read (None: it does). Its ancestors are
        read too when a tree policy could govern it through one."""
        processes = {info.pid: info}
        if policies.covers_descendants:
            processes.update(ancestors_read(info, self._info_or_none))
        governed = governing(info, processes, policies)
        if governed is not None and governed.policy.name == policy:
            return None
        now = f"policy {governed.policy.name} governs it" if governed is not None else "no policy names it"
        return f"pid {info.pid} ({info.comm}) as read now is not policy {policy}'s to change ({now}): nothing changed"

    def _info_or_none(self, pid: int) -> ProcessInfo | None:
        try:
            return self.procfs.process_info(pid)
        except RemediatorError:
            return None

    def _record(self, write, entry: JournalEntry, *args, **kwargs) -> str:
        """Write an outcome record; a journal that fails now is reported, not raised (the change happened)."""
        try:
            write(entry, *args, **kwargs)
        except OSError as exc:
            log.error("journal %s: cannot record the outcome of entry %s: %s", self.journal.path, entry.entry_id, exc.strerror)
            return f" (journal outcome not written: {exc.strerror}; the entry stays open and will be restored)"
        return ""

    @staticmethod
    def _initial_known(entry: JournalEntry, applied: dict | None) -> set[int]:
        known = {int(tid) for tid in entry.original.get("threads", {})}
        known.update(int(tid) for tid in (applied or {}).get("tids", ()))
        return known

    # -- every tick ---------------------------------------------------------------------------
    def maintain(self) -> list[Outcome]:
        """Re-apply to threads created since the change; drop entries whose process is gone.

        New threads are changed every tick; an entry's record is journalled at most every
        MAINTAIN_JOURNAL_INTERVAL_S. Between writes the actuator changes only the threads a restore
        from the record on disk gives back anyway (after a crash, say); the others wait for the write.
        """
        if self.dry_run or self.journal is None:
            return []
        outcomes = []
        now = self.journal.clock()
        for entry in self.journal.active():
            actuator = self.actuators.get(entry.kind)
            if actuator is None or entry.state != "applied":
                continue  # pending entries are settled by reconcile()/restore()
            if self.journal.from_previous_boot(entry):
                outcomes.append(self._drop(entry, actuator, PREVIOUS_BOOT))
                continue
            known = self._known_tids.setdefault(entry.entry_id, self._initial_known(entry, entry.applied))
            noticed = self._noticed_tids.setdefault(entry.entry_id, set())
            in_place = self._in_place(entry)
            last_write = self._journalled_at.get(entry.entry_id)
            # A clock stepped back counts as the interval over. Only per-thread actuators return
            # records, so only they are ever within an interval and given `journalled`.
            waiting = last_write is not None and 0 <= now - last_write < MAINTAIN_JOURNAL_INTERVAL_S
            options = {"journalled": entry.applied or {}} if waiting else {}
            try:
                with self.procfs.hold(entry.identity.pid):
                    try:
                        self.procfs.verify(entry.identity)
                    except ProcessGone:
                        raise
                    except RemediatorError:
                        continue  # unreadable this tick; try again on the next
                    result = actuator.maintain(entry.identity, entry.original, in_place or {}, known, noticed, **options)
            except ProcessGone as exc:
                outcomes.append(self._drop(entry, actuator, str(exc)))
                continue
            except ActuatorError as exc:
                outcomes.append(Outcome(exc.status, entry.kind, entry.identity, exc.message))
                continue
            except (OSError, RemediatorError) as exc:
                outcomes.append(Outcome("failed", entry.kind, entry.identity, str(exc)))
                continue
            note = self._journal_maintained(entry, result.applied if result is not None else None, waiting, now)
            if result is not None:
                outcomes.append(
                    Outcome(result.status, entry.kind, entry.identity, result.message + note, entry.original,
                            result.applied or in_place, result.threads)
                )
        return outcomes

    def _in_place(self, entry: JournalEntry) -> dict | None:
        """What maintain() has in place on the entry's process: its record still waiting for the
        journal, or else the journal's. One built on a record a later step has replaced is dropped."""
        waiting = self._unjournalled.get(entry.entry_id)
        if waiting is not None and waiting.base is entry.applied:
            return waiting.record
        self._unjournalled.pop(entry.entry_id, None)
        return entry.applied

    def _journal_maintained(self, entry: JournalEntry, record: dict | None, waiting: bool, now: float) -> str:
        """Write maintain()'s newest record, now or (within the interval) once the interval is over;
        a failed write keeps it for the next attempt. Returns the note for the outcome message."""
        if record is not None:
            self._unjournalled[entry.entry_id] = Unjournalled(entry.applied, record)
        if waiting or entry.entry_id not in self._unjournalled:
            return ""
        self._journalled_at[entry.entry_id] = now
        note = self._record(self.journal.record_applied, entry, self._unjournalled[entry.entry_id].record)
        if not note:
            del self._unjournalled[entry.entry_id]
        return note

    def _forget_maintained(self, entry_id: str) -> None:
        for state in (self._known_tids, self._noticed_tids, self._unjournalled, self._journalled_at):
            state.pop(entry_id, None)

    # -- restore ------------------------------------------------------------------------------
    def restore(self, identity: ProcessIdentity | None = None, kinds: Iterable[str] | None = None) -> list[Outcome]:
        """Restore active changes (all when identity is None), newest first."""
        wanted = set(kinds) if kinds is not None else None
        return self._restore_entries(
            entry
            for entry in self.active()
            if (identity is None or entry.identity == identity) and (wanted is None or entry.kind in wanted)
        )

    def restore_pid(self, pid: int) -> list[Outcome]:
        """Restore what was changed on `pid`; entries of an earlier process with that pid are dropped."""
        return self._restore_entries(entry for entry in self.active() if entry.identity.pid == pid)

    def _restore_entries(self, entries: Iterable[JournalEntry]) -> list[Outcome]:
        if self.dry_run:
            return []
        # Newest first: a later change (cpuset after affinity) is undone before the earlier one.
        ordered = sorted(entries, key=lambda entry: entry.order, reverse=True)
        return [self._restore_entry(entry) for entry in ordered]

    def _restore_entry(self, entry: JournalEntry) -> Outcome:
        assert self.journal is not None
        identity, kind = entry.identity, entry.kind

        def outcome(status: str, message: str, left: dict | None = None) -> Outcome:
            return Outcome(status, kind, identity, message, entry.original, entry.applied, left=left)

        actuator = self.actuators.get(kind)
        if actuator is None:
            return outcome("failed", f"no actuator for kind {kind!r}: entry {entry.entry_id} left in the journal")
        if self.journal.from_previous_boot(entry):
            return self._drop(entry, actuator, PREVIOUS_BOOT)
        try:
            # Held from the identity check to the end of the restore, as in apply().
            with self.procfs.hold(identity.pid):
                try:
                    self.procfs.verify(identity)
                except ProcessGone:
                    raise
                except RemediatorError as exc:
                    return outcome("failed", f"cannot read the process: {exc}")
                # An intent whose outcome is unknown: a value from either it or the step before is ours.
                planned = entry.target if entry.state == "pending" else None
                result = actuator.restore(identity, entry.original, self._in_place(entry), planned)
        except ProcessGone as exc:
            return self._drop(entry, actuator, str(exc))
        except ActuatorError as exc:
            if exc.closes_entry:
                self._record(self.journal.record_dropped, entry, exc.message)
            return outcome(exc.status, exc.message)
        except (OSError, RemediatorError) as exc:
            return outcome("failed", f"{exc}; the entry stays in the journal for another attempt")
        # Closed either way: what someone else set since stays theirs, and the entry has nothing left to give back.
        message = result.message + self._record(self.journal.record_restored, entry, result.message)
        self._forget_maintained(entry.entry_id)
        return outcome("restored" if result.restored else LEFT_BY_OTHER, message, result.left)

    def _drop(self, entry: JournalEntry, actuator: Actuator, reason: str) -> Outcome:
        """The process left (or its pid names another one now): close the entry, touch nothing of
        the process; what outlives it (a unit's property, a group of ours) the actuator's cleanup
        gives back. A cleanup that could not ask (systemd unreachable) keeps the entry open for the
        next attempt: closing it would lose the original for good. So does one on a unit that a
        newer change of the same kind holds (another offender of that unit): that one gives back
        this one's value first, then this one the unit's original, as a revert does newest first."""
        newer = self._newer_on_the_same_unit(entry)
        if newer is not None:
            return Outcome("unchanged", entry.kind, entry.identity,
                           f"{reason}: {entry.original['unit']} is given back after the newer change on it (entry "
                           f"{newer.entry_id}); the entry stays until then", entry.original, entry.applied)
        try:
            cleanup = actuator.cleanup(entry.original, entry.applied or entry.target)
        except ActuatorError as exc:
            return Outcome("failed", entry.kind, entry.identity,
                           f"{reason}: {exc.message}; the entry stays in the journal for another attempt", entry.original, entry.applied)
        except (OSError, RemediatorError) as exc:
            cleanup = f"cleanup failed: {exc}"
        message = f"{reason}: nothing to restore" + (f"; {cleanup}" if cleanup else "")
        if self.journal is not None:
            message += self._record(self.journal.record_dropped, entry, message)
        self._forget_maintained(entry.entry_id)
        return Outcome("dropped", entry.kind, entry.identity, message, entry.original, entry.applied)

    def _newer_on_the_same_unit(self, entry: JournalEntry) -> JournalEntry | None:
        unit = (entry.original or {}).get("unit")
        if not unit or self.journal is None:
            return None
        for other in self.journal.active():
            if (other.entry_id != entry.entry_id and other.kind == entry.kind and other.order > entry.order
                    and (other.original or {}).get("unit") == unit):
                return other
        return None

    # -- start-up -----------------------------------------------------------------------------
    def reconcile(self, on_start: str) -> list[Outcome]:
        """Settle what a previous run left in the journal.

        "restore": restore everything whose process is still the same one.
        "keep": keep applied changes and adopt them (maintain() continues); changes whose outcome
        was never written (a crash mid-change) are restored either way.
        Entries of processes that are gone are dropped in both modes.
        """
        if on_start not in ON_START_CHOICES:
            raise ValueError(f"on_start must be one of {', '.join(ON_START_CHOICES)}, not {on_start!r}")
        if self.dry_run:
            return []
        outcomes = []
        for entry in sorted(self.active(), key=lambda entry: entry.order, reverse=True):
            if on_start == "restore" or entry.state == "pending":
                outcomes.append(self._restore_entry(entry))
                continue
            actuator = self.actuators.get(entry.kind)
            if actuator is None:
                continue
            if self.journal.from_previous_boot(entry):
                outcomes.append(self._drop(entry, actuator, PREVIOUS_BOOT))
                continue
            try:
                self.procfs.verify(entry.identity)
            except ProcessGone as exc:
                outcomes.append(self._drop(entry, actuator, str(exc)))
                continue
            except RemediatorError:
                continue
            # Threads created while no remediator ran are not in `known`: maintain() covers them.
            self._known_tids[entry.entry_id] = self._initial_known(entry, entry.applied)
            outcomes.append(
                Outcome(
                    "unchanged",
                    entry.kind,
                    entry.identity,
                    f"kept {entry.kind} {_summary(entry.applied)} from policy {entry.policy or '?'} (step {entry.step_index})",
                    entry.original,
                    entry.applied,
                )
            )
        return outcomes

    def active(self) -> list[JournalEntry]:
        """Active journal entries (identity, kind, original, applied, policy, since), oldest first."""
        return self.journal.active() if self.journal is not None else []


def _summary(applied: dict | None) -> str:
    if not applied:
        return "?"
    if "setting" in applied:
        return f"{applied['cgroup']} ({applied['setting']})"
    if "properties" in applied:
        return f"{applied['unit']} {applied['properties']}"
    if "cgroup" in applied:
        return f"{applied['cgroup']} (CPUs {format_cpulist(applied.get('cpus', ()))})"
    if "nice" in applied:
        return str(applied["nice"])
    if "sched" in applied:
        return str(applied["sched"])
    if "cpus" in applied:
        return "{" + format_cpulist(applied["cpus"]) + "}"
    return "?"
