"""The shape shared by the per-thread knobs (nice, affinity).

On Linux both are per thread: the syscalls take a tid, and a new thread inherits the value of the
thread that created it. So a change is made on every tid in /proc/<pid>/task, the original is saved
per thread plus a default (the main thread's) for threads that appear later, and a thread created
after the change is caught by maintain().

Never worse: each thread gets `rule(its value, the step's value)`, which only ever lowers what it
gets (nice.weaker_nice, affinity.narrowed_mask); a thread the rule leaves is not written. What was
set is journalled per thread (`"set": {tid: value}` in the applied record), so a restore, a later
step and maintain() touch a thread only while it still holds what remediator set: a value someone
else (an operator's renice/taskset, or the thread itself) put there since is left, and said so.

A record holds only the threads alive when it is written (`_live_record`): a thread that exited
needs no restore, so a process that churns threads costs a record the size of its live threads, not
of every thread it ever had. A value set on a thread that exited stays ours (`"inherited"`) while a
thread born after the change holds it, since that thread may have inherited it.
"""

from __future__ import annotations

from typing import Callable, Collection, Generic, Iterable, TypeVar

from ..errors import ProcessGone
from ..procfs import ProcessIdentity, ProcFS
from .base import (
    ActuatorError,
    ApplyResult,
    MaintainResult,
    Plan,
    RestoreResult,
    Syscalls,
    change_error,
    ensure_alive,
    group_counts,
    plural_threads,
    thread_values,
)

V = TypeVar("V")


class PerThreadActuator(Generic[V]):
    kind = ""
    value_key = ""  # the key of the value in targets and applied records ("nice", "cpus")

    def __init__(self, procfs: ProcFS, syscalls: Syscalls | None = None):
        self.procfs = procfs
        self.syscalls = syscalls or Syscalls()

    # -- the knob (subclasses) ----------------------------------------------------------------
    def get(self, tid: int) -> V:
        raise NotImplementedError

    def set(self, tid: int, value: V) -> None:
        raise NotImplementedError

    def call_text(self, value: V, tid: str = "tid") -> str:
        """The syscall as written in messages: 'setpriority(PRIO_PROCESS, tid, 10)'."""
        raise NotImplementedError

    def value_text(self, value: V) -> str:
        raise NotImplementedError

    def to_json(self, value: V) -> object:
        raise NotImplementedError

    def from_json(self, data: object) -> V:
        raise NotImplementedError

    def rule(self, current: V, value: V) -> V | None:
        """What a thread at `current` gets from a step asking `value`; None: leave it (never worse)."""
        raise NotImplementedError

    def already_text(self, value: V) -> str:
        """Why the rule left a thread: 'at nice 10 or weaker', 'within {1}'."""
        raise NotImplementedError

    def resolve(self, identity: ProcessIdentity, target: dict) -> tuple[V, str, dict]:
        """(value to set, a note for the description, extra keys for the applied record)."""
        raise NotImplementedError

    def explain(self, errno_value: int | None, value: V) -> str:
        """Why the kernel might refuse this value (appended to EINVAL/EPERM messages)."""
        return ""

    # -- read, plan -------------------------------------------------------------------------
    def read(self, pid: int) -> dict:
        values, default = thread_values(self.procfs, pid, self.get)
        return {
            "threads": {str(tid): self.to_json(value) for tid, value in values.items()},
            "default": self.to_json(default),
        }

    def _threads(self, state: dict) -> dict[int, V]:
        return {int(tid): self.from_json(value) for tid, value in state["threads"].items()}

    def _set_map(self, record: dict | None) -> dict[int, V] | None:
        """What remediator set on each thread, from an applied (or planned) record. None for a record
        without it: one written before remediator kept it (such an entry is restored unconditionally,
        as it was then), or one whose outcome is unknown."""
        if record is None or "set" not in record:
            return None
        return {int(tid): self.from_json(value) for tid, value in record["set"].items()}

    def _inherited(self, record: dict | None) -> list[V]:
        """Values set on threads that exited since, which a thread born after the change still held
        when the record was written (absent from records written before they were kept)."""
        return [self.from_json(value) for value in (record or {}).get("inherited", ())]

    def _live_record(
        self,
        pid: int,
        record: dict,
        set_map: dict[int, V],
        tids: Iterable[int],
        inherited: Iterable[V],
        value: V,
        originals: Collection[int],
        live: Collection[int],
    ) -> dict:
        """`record` with `tids` and `set` cut to the threads alive now, and `inherited` worked out again.

        A number missing from this listing is asked for directly before it is dropped: a listing
        taken while threads exit can skip a live one, and dropping that one would lose its restore.
        A value set on an exited thread matters only to a thread born after the change that holds
        it now (restore counts such a thread as ours by the value it holds): it is kept while one
        does, and dropped once none does, so the record stays as small as the live process.
        """
        tids = set(tids)
        exited = self._exited(pid, {*set_map, *tids}, live)
        still_set = {tid: held for tid, held in set_map.items() if tid not in exited}
        unheld = {set_map[tid] for tid in exited if tid in set_map} | set(inherited)
        unheld -= {value, *still_set.values()}  # ours anyway: the step's value, or a live thread's in `set`
        kept = self._held_by_born_after(unheld, live, still_set, originals) if unheld else []
        result = {key: item for key, item in record.items() if key not in ("tids", "set", "inherited")}
        result["tids"] = sorted(tids - exited)
        result["set"] = {str(tid): self.to_json(held) for tid, held in sorted(still_set.items())}
        if kept:
            result["inherited"] = [self.to_json(held) for held in kept]
        return result

    def _held_by_born_after(self, unheld: set[V], live: Collection[int], still_set: dict[int, V], originals: Collection[int]) -> list[V]:
        """Which of `unheld` a live thread holds that restore judges by its value (neither in `set`
        nor one of the originals). A thread that cannot be read might hold any of them: all stay."""
        held: list[V] = []
        for tid in sorted(live):
            if not unheld:
                break
            if tid in still_set or tid in originals:
                continue
            try:
                now = self.get(tid)
            except ProcessLookupError:
                continue
            except OSError:
                return held + sorted(unheld, key=self.value_text)
            if now in unheld:
                unheld.discard(now)
                held.append(now)
        return held

    def _restorable(self, journalled: dict, original: dict) -> Callable[[int, V], bool]:
        """Would a restore from `journalled` alone (after a crash now) give a thread holding `value`
        its original back? As restore() judges: a thread in `set` while it holds what is set there,
        an original thread not in `set` never, any other while it holds one of the record's values."""
        recorded = self._set_map(journalled)
        if recorded is None:
            return lambda tid, value: True  # such a record is restored unconditionally
        originals = {int(tid) for tid in original["threads"]}
        values = {*recorded.values(), *self._inherited(journalled)}
        if self.value_key in journalled:
            values.add(self.from_json(journalled[self.value_key]))

        def restorable(tid: int, value: V) -> bool:
            if tid in recorded:
                return recorded[tid] == value
            return tid not in originals and value in values

        return restorable

    def _exited(self, pid: int, tids: Iterable[int], live: Collection[int]) -> set[int]:
        """Those of `tids` that exited: missing from the listing `live`, and asked for directly (a
        listing taken while threads exit can skip a live one)."""
        return {tid for tid in tids if tid not in live and not self.procfs.owns_thread(pid, tid)}

    def _forget_exited(self, pid: int, live: Collection[int], *tid_sets: set[int] | None) -> None:
        """Drop the threads that exited from maintain()'s bookkeeping, so it stays as small as the
        live process (and a number the kernel hands to a new thread later is new again)."""
        for tids in tid_sets:
            if tids:
                tids.difference_update(self._exited(pid, tids, live))

    def _calls(self, values: dict[int, V], new: str = "") -> str:
        """'setpriority(PRIO_PROCESS, tid, 10) on 3 threads' (one call per distinct value)."""
        groups: dict[str, list[int]] = {}
        for tid, value in sorted(values.items()):
            groups.setdefault(self.value_text(value), []).append(tid)
        return " and ".join(
            f"{self.call_text(values[tids[0]])} on {len(tids)} {new}thread{'s' if len(tids) != 1 else ''}"
            for tids in groups.values()
        )

    def _left_text(self, kept: dict[int, V], value: V, others: dict[int, tuple[V, V]]) -> str:
        """The threads a change leaves as they are, and why."""
        text = ""
        if kept:
            text += (
                f"; {plural_threads(len(kept))} already {self.already_text(value)} "
                f"({group_counts(self.value_text(v) for v in kept.values())}): left as {'they are' if len(kept) != 1 else 'it is'}"
            )
        if others:
            text += "; " + self._others_text(others)
        return text

    def _others_text(self, others: dict[int, tuple[V, V]]) -> str:
        shown = ", ".join(
            f"tid {tid} is {self.value_text(now)} (remediator set {self.value_text(ours)})"
            for tid, (now, ours) in sorted(others.items())[:5]
        ) + (", ..." if len(others) > 5 else "")
        return f"{plural_threads(len(others))} changed by someone else since remediator set {'them' if len(others) != 1 else 'it'}, left as {'they are' if len(others) != 1 else 'it is'}: {shown}"

    def _describe_changes(self, pid: int, changes: dict[int, V], was: list[V], note: str) -> str:
        was_text = group_counts(self.value_text(v) for v in was) if was else "unknown"
        text = f"{self._calls(changes)} of pid {pid} (was {was_text})"
        return f"{text}; {note}" if note else text

    def plan(
        self, identity: ProcessIdentity, target: dict, current: dict, *, original: dict | None = None, applied: dict | None = None
    ) -> Plan:
        """`original` and `applied`: the journal entry's, when an earlier step is in place. A thread
        that no longer holds what that step left on it was changed by someone else: left alone."""
        value, note, extra = self.resolve(identity, target)
        threads = self._threads(current)
        ours = self._set_map(applied)
        # An earlier step whose record has no per-thread values (older journal, or its outcome
        # unknown): what is ours cannot be told, so this step neither records nor compares them.
        track = applied is None or ours is not None
        first = self._threads(original) if ours is not None and original else {}
        changes: dict[int, V] = {}
        kept: dict[int, V] = {}
        others: dict[int, tuple[V, V]] = {}
        for tid, now in threads.items():
            if ours is not None and (tid in ours or tid in first):
                left_there = ours[tid] if tid in ours else first[tid]
                if now != left_there:
                    others[tid] = (now, left_there)
                    continue
            new = self.rule(now, value)
            if new is None:
                kept[tid] = now
            else:
                changes[tid] = new
        left = self._left_text(kept, value, others)
        if not changes:
            description = f"{self.kind} of {plural_threads(len(threads))} of pid {identity.pid}: nothing to change" + left
            return Plan(self.kind, identity, current, target, description, unchanged=True, threads=0)
        description = self._describe_changes(identity.pid, changes, [threads[tid] for tid in changes], note) + left
        details = {
            "value": self.to_json(value),
            "note": note,
            "extra": extra,
            "set": {str(tid): self.to_json(new) for tid, new in changes.items()},
            "skip": sorted([*kept, *others]),
            "left": left,
            "earlier": None if not track else {str(tid): self.to_json(v) for tid, v in (ours or {}).items()},
            "inherited": [self.to_json(v) for v in self._inherited(applied)],
            # The threads restore gives their own original (the first step's threads).
            "originals": sorted(self._threads(original) if original else threads),
        }
        expected = {self.value_key: self.to_json(value), **extra}
        if track:
            expected["set"] = {**details["earlier"], **details["set"]}
        return Plan(self.kind, identity, current, target, description, threads=len(changes), details=details, expected=expected)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        pid = plan.identity.pid
        details = plan.details
        value = self.from_json(details["value"])
        planned = {int(tid): self.from_json(new) for tid, new in details["set"].items()}
        skip = set(details.get("skip", ()))
        changed: dict[int, V] = {}  # tid -> value before our change, for the rollback
        set_now: dict[int, V] = {}
        seen: list[int] = []
        for tid in sorted(self.procfs.tids(pid)):
            new: V | None = planned.get(tid)
            try:
                if tid in skip:
                    seen.append(tid)
                    continue
                # Read right before the set: whoever holds the number now is what a rollback restores.
                previous = self.get(tid)
                if tid not in planned:  # born since the plan: the same rule
                    new = self.rule(previous, value)
                    if new is None:
                        seen.append(tid)
                        continue
                assert new is not None
                self.set(tid, new)
            except ProcessLookupError:
                continue  # the thread exited: nothing to change
            except OSError as exc:
                shown = value if new is None else new
                error = change_error(exc, f"{self.call_text(shown, str(tid))} (thread of pid {pid})", self.explain(exc.errno, shown))
                raise self._rolled_back(error, changed) from None
            changed[tid] = previous
            set_now[tid] = new
            seen.append(tid)
        strays, stray_note = self._undo_strays(pid, {tid: (previous, set_now[tid]) for tid, previous in changed.items()})
        for tid in strays:
            changed.pop(tid, None)
            set_now.pop(tid, None)
        seen = [tid for tid in seen if tid not in strays]
        # Every set may have failed with ESRCH because the process left (or the pid was reused).
        try:
            ensure_alive(self.procfs, plan.identity)
        except ProcessGone as exc:
            raise ProcessGone(pid, f"{str(exc).removeprefix(f'pid {pid}: ')}{stray_note}") from None
        if not seen:
            raise ProcessGone(pid, "no thread left to change")
        applied = {self.value_key: self.to_json(value), "tids": sorted(seen), **details.get("extra", {})}
        if details.get("earlier") is not None:
            earlier = {int(tid): self.from_json(v) for tid, v in details["earlier"].items()}
            inherited = [self.from_json(v) for v in details.get("inherited", ())]
            applied = self._live_record(
                pid, applied, {**earlier, **set_now}, seen, inherited, value, set(details.get("originals", ())), set(seen)
            )
        if set_now:
            message = self._describe_changes(pid, set_now, list(changed.values()), details.get("note", ""))
        else:
            message = f"{self.kind} of pid {pid}: the threads to change exited meanwhile, nothing changed"
        return ApplyResult(applied=applied, message=message + details.get("left", ""), threads=len(set_now))

    def _undo_strays(self, pid: int, done: dict[int, tuple[V, V]]) -> tuple[set[int], str]:
        """Put back changes that landed on another process (its pid or tid reused mid-change).

        done: tid -> (value read right before the set, value set). A number that is no longer a
        thread of the held process either was our thread and exited (nothing to do), or named a
        stranger when we set it: a stranger that carries exactly our value gets back what was read
        from that number just before the set. Returns (those numbers, a note for the message).
        """
        strays = {tid for tid in done if not self.procfs.owns_thread(pid, tid)}
        undone = 0
        for tid in sorted(strays):
            before, ours = done[tid]
            if before == ours:
                continue
            try:
                if self.get(tid) == ours:
                    self.set(tid, before)
                    undone += 1
            except OSError:
                continue  # nobody holds the number now: nothing to undo
        note = f"; {plural_threads(undone)} of another process that took the number put back as they were" if undone else ""
        return strays, note

    def _rolled_back(self, error: ActuatorError, changed: dict[int, V]) -> ActuatorError:
        """Put back what this apply changed before failing; say whether that worked."""
        failures = 0
        for tid, previous in changed.items():
            try:
                self.set(tid, previous)
            except ProcessLookupError:
                continue
            except OSError:
                failures += 1
        if not changed:
            error.message += "; nothing was changed"
        elif failures:
            error.message += f"; rolling back failed on {plural_threads(failures)}, left changed"
            error.left_changed = True
        else:
            error.message += f"; the {plural_threads(len(changed))} already changed were rolled back"
        error.args = (error.message,)
        return error

    # -- restore ----------------------------------------------------------------------------
    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None) -> RestoreResult:
        """Each thread its original, where it still holds what remediator set.

        `planned`: the intent of a step whose outcome is unknown (a crash mid-change): a thread
        holding either the applied or the planned value is ours. A record without per-thread values
        (written before they were kept) is restored unconditionally, as it was then.
        """
        pid = identity.pid
        originals = self._threads(original)
        default = self.born_since_value(self.from_json(original["default"]))
        records = [record for record in (applied, planned) if record is not None]
        maps = [self._set_map(record) for record in records]
        unconditional = not records or any(found is None for found in maps)
        ours: dict[int, list[V]] = {}
        for found in maps:
            for tid, value in (found or {}).items():
                ours.setdefault(tid, []).append(value)
        # A thread born after the change holds one of our values when it inherited it from a thread we set.
        our_values = [value for values in ours.values() for value in values]
        our_values += [self.from_json(record[self.value_key]) for record in records if self.value_key in record]
        our_values += [value for record in records for value in self._inherited(record)]
        restored: dict[int, V] = {}
        before_restore: dict[int, V] = {}  # what each number carried right before our set
        others: dict[int, tuple[V, V]] = {}
        untouched = 0
        errors: list[str] = []
        first_error: ActuatorError | None = None
        for tid in sorted(self.procfs.tids(pid)):
            # Threads that existed at the change get their own value, later ones the default.
            value = originals.get(tid, default)
            try:
                now = self.get(tid)
                if not unconditional:
                    if tid in ours:
                        if now == value:
                            continue  # already its original (an intent never carried out, say)
                        if now not in ours[tid]:
                            others[tid] = (now, ours[tid][-1])
                            continue
                    elif tid in originals or now not in our_values:
                        untouched += 1  # remediator never changed it, or it holds a value of its own
                        continue
                self.set(tid, value)
            except ProcessLookupError:
                continue  # the thread vanished: nothing to restore
            except OSError as exc:
                error = change_error(exc, f"{self.call_text(value, str(tid))} (thread of pid {pid})", self.explain(exc.errno, value))
                first_error = first_error or error
                errors.append(error.message)
                continue
            restored[tid] = value
            before_restore[tid] = now
        strays, stray_note = self._undo_strays(pid, {tid: (before_restore[tid], value) for tid, value in restored.items()})
        for tid in strays:
            del restored[tid]
        was = [before_restore[tid] for tid in restored]
        try:
            ensure_alive(self.procfs, identity)
        except ProcessGone as exc:
            raise ProcessGone(pid, f"{str(exc).removeprefix(f'pid {pid}: ')}{stray_note}") from None
        if first_error is not None:
            first_error.message = f"restored {plural_threads(len(restored))}, failed on {len(errors)}: {errors[0]}"
            first_error.args = (first_error.message,)
            raise first_error
        was_text = group_counts(self.value_text(v) for v in was) if was else "unknown"
        message = f"{self._calls(restored) or 'no thread to restore'} of pid {pid} (was {was_text})"
        if others:
            message += "; " + self._others_text(others)
        if untouched:
            message += f"; {plural_threads(untouched)} not changed by remediator"
        left = None
        if others:
            left = {
                "threads": {
                    str(tid): {"now": self.to_json(now), "set": self.to_json(ours_value)}
                    for tid, (now, ours_value) in sorted(others.items())
                }
            }
        return RestoreResult(message, restored=bool(restored) or not others, left=left)

    def born_since_value(self, default: V) -> V:
        """What a thread born after the change (holding a value of ours it inherited) gets back:
        the process's default (its main thread's original); an actuator may make it safer."""
        return default

    # -- threads created since --------------------------------------------------------------
    def maintain(
        self,
        identity: ProcessIdentity,
        original: dict,
        applied: dict,
        known_tids: set[int],
        noticed: set[int] | None = None,
        *,
        journalled: dict | None = None,
    ) -> MaintainResult | None:
        """The rule on threads born since (a thread that reset its own value gets the change again);
        a thread that was there and no longer holds what remediator set is left, and said so once
        (`noticed` holds the tids already reported). Both sets are cut to the live threads.

        `journalled`: given when this round's record cannot be journalled yet (the executor writes
        an entry's record at most every few seconds): the record on disk. A new thread is changed
        now only when a restore from that record alone would give it back (after a crash, say); one
        that would get a value it does not count as ours waits for the round that can journal it.
        """
        pid = identity.pid
        value = self.from_json(applied[self.value_key])
        ours = self._set_map(applied)
        live = set(self.procfs.tids(pid))
        self._forget_exited(pid, live, known_tids, noticed)
        restorable = None if journalled is None else self._restorable(journalled, original)
        set_now: dict[int, V] = {}
        others: dict[int, tuple[V, V]] = {}
        for tid in sorted(live):
            if tid in known_tids:
                if ours is None or noticed is None or tid not in ours or tid in noticed:
                    continue
                try:
                    now = self.get(tid)
                except OSError:
                    continue  # exited, or unreadable this tick
                if now != ours[tid]:
                    noticed.add(tid)  # one report, not one per tick
                    others[tid] = (now, ours[tid])
                continue
            # Known from now on, even if the change below fails: one report, not one per tick.
            known_tids.add(tid)
            new: V | None = None
            try:
                new = self.rule(self.get(tid), value)
                if new is None:
                    continue  # inherited the value (or a weaker one) from the thread that created it
                if restorable is not None and not restorable(tid, new):
                    known_tids.discard(tid)  # new again next round: changed once its value can be journalled
                    continue
                self.set(tid, new)
            except ProcessLookupError:
                continue
            except OSError as exc:
                shown = value if new is None else new
                raise change_error(exc, f"{self.call_text(shown, str(tid))} (new thread of pid {pid})", self.explain(exc.errno, shown)) from None
            set_now[tid] = new
        if not set_now and not others:
            return None
        record = None
        if set_now and ours is not None:
            # Journalled, so that after a restart these are ours, not new threads to change again.
            record = self._live_record(
                pid,
                applied,
                {**ours, **set_now},
                {*(int(tid) for tid in applied.get("tids", ())), *set_now},
                self._inherited(applied),
                value,
                {int(tid) for tid in original["threads"]},
                live,
            )
        if not set_now:
            return MaintainResult(f"pid {pid}: " + self._others_text(others), 0, status="left-changed-by-other")
        message = f"{self._calls(set_now, 'new ')} of pid {pid}"
        if others:
            message += "; " + self._others_text(others)
        return MaintainResult(message, len(set_now), applied=record)

    def cleanup(self, original: dict, applied: dict | None) -> str:
        return ""  # per-thread values vanish with the process
