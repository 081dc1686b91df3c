"""The shape shared by the per-thread knobs (nice, affinity).

On Linux both are per thread: the syscalls take a tid, and a new thread inherits the value of the
thread that created it. So a change is made on every tid in /proc/<pid>/task, the original is saved
per thread plus a default (the main thread's) for threads that appear later, and a thread created
after the change is caught by maintain().
"""

from __future__ import annotations

from typing import Generic, TypeVar

from ..errors import ProcessGone
from ..procfs import ProcessIdentity, ProcFS
from .base import (
    ActuatorError,
    ApplyResult,
    MaintainResult,
    Plan,
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

    def resolve(self, identity: ProcessIdentity, target: dict) -> tuple[V, str, dict]:
        """(value to set, a note for the description, extra keys for the applied record)."""
        raise NotImplementedError

    def explain(self, errno_value: int | None, value: V) -> str:
        """Why the kernel might refuse this value (appended to EINVAL/EPERM messages)."""
        return ""

    def keep(self, current: V, value: V) -> bool:
        """True where a thread is to be left as it is (a kind that must never raise a thread)."""
        return current == value

    # -- read, plan -------------------------------------------------------------------------
    def read(self, pid: int) -> dict:
        values, default = thread_values(self.procfs, pid, self.get)
        return {
            "threads": {str(tid): self.to_json(value) for tid, value in values.items()},
            "default": self.to_json(default),
        }

    def _threads(self, state: dict) -> dict[int, V]:
        return {int(tid): self.from_json(value) for tid, value in state["threads"].items()}

    def describe(self, value: V, count: int, pid: int, was: list[V], note: str = "") -> str:
        was_text = group_counts(self.value_text(v) for v in was) if was else "unknown"
        text = f"{self.call_text(value)} on {plural_threads(count)} of pid {pid} (was {was_text})"
        return f"{text}; {note}" if note else text

    def plan(self, identity: ProcessIdentity, target: dict, current: dict) -> Plan:
        value, note, extra = self.resolve(identity, target)
        threads = self._threads(current)
        if all(self.keep(existing, value) for existing in threads.values()):
            description = (
                f"{self.kind} of {plural_threads(len(threads))} of pid {identity.pid} is already {self.value_text(value)}"
            )
            return Plan(self.kind, identity, current, target, description, unchanged=True, threads=0)
        # Threads a kind leaves as they are (already lower) are neither counted nor shown as "was".
        reached = [existing for existing in threads.values() if existing == value or not self.keep(existing, value)]
        description = self.describe(value, len(reached), identity.pid, reached, note)
        details = {"value": self.to_json(value), "note": note, "extra": extra}
        expected = {self.value_key: self.to_json(value), **extra}
        return Plan(self.kind, identity, current, target, description, threads=len(reached), details=details, expected=expected)

    # -- apply ------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        pid = plan.identity.pid
        value = self.from_json(plan.details["value"])
        changed: dict[int, V] = {}  # tid -> value before our change, for the rollback
        for tid in sorted(self.procfs.tids(pid)):
            try:
                # Read right before the set: whoever holds the number now is what a rollback restores.
                previous = self.get(tid)
                if self.keep(previous, value) and previous != value:
                    continue  # left as it is (already at or below the target)
                self.set(tid, value)
            except ProcessLookupError:
                continue  # the thread exited: nothing to change
            except OSError as exc:
                error = change_error(exc, f"{self.call_text(value, str(tid))} (thread of pid {pid})", self.explain(exc.errno, value))
                raise self._rolled_back(error, changed) from None
            changed[tid] = previous
        strays, note = self._undo_strays(pid, {tid: (previous, value) for tid, previous in changed.items()})
        for tid in strays:
            del changed[tid]
        # Every set may have failed with ESRCH because the process left (or the pid was reused).
        try:
            ensure_alive(self.procfs, plan.identity)
        except ProcessGone as exc:
            raise ProcessGone(pid, f"{str(exc).removeprefix(f'pid {pid}: ')}{note}") from None
        if not changed:
            raise ProcessGone(pid, "no thread left to change")
        was = list(changed.values())
        applied = {self.value_key: self.to_json(value), "tids": sorted(changed), **plan.details.get("extra", {})}
        message = self.describe(value, len(changed), pid, was, plan.details.get("note", ""))
        return ApplyResult(applied=applied, message=message, threads=len(changed))

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
    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None) -> str:
        pid = identity.pid
        originals = self._threads(original)
        default = self.from_json(original["default"])
        restored: dict[int, V] = {}
        before_restore: dict[int, V] = {}  # what each number carried right before our set
        was: list[V] = []
        errors: list[str] = []
        first_error: ActuatorError | None = None
        for tid in sorted(self.procfs.tids(pid)):
            # Threads that existed at the change get their own value, later ones the default.
            value = originals.get(tid, default)
            try:
                current = self.get(tid)
                self.set(tid, value)
            except ProcessLookupError:
                continue  # the thread vanished: nothing to restore
            except OSError as exc:
                error = change_error(exc, f"{self.call_text(value, str(tid))} (thread of pid {pid})", self.explain(exc.errno, value))
                first_error = first_error or error
                errors.append(error.message)
                continue
            was.append(current)
            restored[tid] = value
            before_restore[tid] = current
        strays, note = self._undo_strays(pid, {tid: (before_restore[tid], value) for tid, value in restored.items()})
        for tid in strays:
            del restored[tid]
        try:
            ensure_alive(self.procfs, identity)
        except ProcessGone as exc:
            raise ProcessGone(pid, f"{str(exc).removeprefix(f'pid {pid}: ')}{note}") from None
        if first_error is not None:
            first_error.message = f"restored {plural_threads(len(restored))}, failed on {len(errors)}: {errors[0]}"
            first_error.args = (first_error.message,)
            raise first_error
        groups: dict[str, list[int]] = {}
        for tid, value in restored.items():
            groups.setdefault(self.value_text(value), []).append(tid)
        calls = [
            f"{self.call_text(value)} on {plural_threads(len(tids))}"
            for value, tids in ((restored[tids[0]], tids) for tids in groups.values())
        ]
        was_text = group_counts(self.value_text(v) for v in was) if was else "unknown"
        return f"{' and '.join(calls) or 'no thread left'} of pid {pid} (was {was_text})"

    # -- threads created since --------------------------------------------------------------
    def maintain(self, identity: ProcessIdentity, original: dict, applied: dict, known_tids: set[int]) -> MaintainResult | None:
        pid = identity.pid
        value = self.from_json(applied[self.value_key])
        changed = 0
        for tid in sorted(self.procfs.tids(pid)):
            if tid in known_tids:
                continue
            # Known from now on, even if the change below fails: one report, not one per tick.
            known_tids.add(tid)
            try:
                if self.keep(self.get(tid), value):
                    continue  # inherited the value from the thread that created it, or left as it is
                self.set(tid, value)
            except ProcessLookupError:
                continue
            except OSError as exc:
                raise change_error(exc, f"{self.call_text(value, str(tid))} (new thread of pid {pid})", self.explain(exc.errno, value)) from None
            changed += 1
        if not changed:
            return None
        return MaintainResult(f"{self.call_text(value)} on {changed} new thread{'s' if changed != 1 else ''} of pid {pid}", changed)

    def cleanup(self, original: dict, applied: dict | None) -> str:
        return ""  # per-thread values vanish with the process

