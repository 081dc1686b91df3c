"""Scheduling policy (SCHED_IDLE, SCHED_BATCH), on every thread of a process.

Like nice, the policy is per thread: sched_setscheduler(tid, ...) changes one thread, and a new
thread inherits its creator's. Like nice it weighs a thread only against the others of its
scheduling group (a cpu cgroup or an autogroup: schedgroups.py): there SCHED_IDLE gets the weight of
nice 19 divided by about five, and EEVDF/CFS let any normal task of the group preempt it at wakeup;
between groups the groups' own weights decide (bench/first_step.py: no help in the layout with
service and sidecar in cgroups of their own, see policies/log-shippers.toml).

Never a raise: policies rank idle < batch < normal < realtime, and a step only moves a thread down
to its target; a thread already at or below it is left as it is. Realtime threads (FIFO, RR,
deadline) are never touched: the shipped unit's RestrictRealtime= would refuse giving them their
class back, and a deadline thread's parameters cannot be restored through sched_setscheduler.

Children inherit the policy too (SCHED_RESET_ON_FORK resets only realtime policies), so a process
forked by the offender while the step is in place would keep SCHED_IDLE after the revert
(ananicy-rules#580). The applied record keeps the boot-time clock of the change, and restore also
puts back the descendants born since that still hold exactly the policy we set (those whose
parent is gone by then were re-parented and are out of reach).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from typing import Any, Mapping

from ..errors import RemediatorError
from ..keys import Key
from ..procfs import ProcessIdentity, ProcFS
from .base import ChangeInvalid, RestoreResult, Syscalls, change_error, plural_threads
from .kind import AvailableEverywhere, Compiling, Host, plural, summarize_threads, task_file
from .threads import PerThreadActuator

SCHED_DEADLINE = 6
RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)

# name -> policy number, for the policies a value can hold.
POLICIES = {
    "other": os.SCHED_OTHER,
    "batch": os.SCHED_BATCH,
    "idle": os.SCHED_IDLE,
    "fifo": os.SCHED_FIFO,
    "rr": os.SCHED_RR,
    "deadline": SCHED_DEADLINE,
}
NAMES = {number: name for name, number in POLICIES.items()}
TARGETS = ("idle", "batch")  # what a step may ask for
# Realtime threads are never touched: their class could not be given back under the shipped unit
# (RestrictRealtime= refuses SCHED_FIFO/RR), nor a deadline thread's parameters by sched_setscheduler.
REALTIME = frozenset({"fifo", "rr", "deadline"})
# Lower rank, less CPU: a step never moves a thread up this order.
RANK = {"idle": 0, "batch": 1, "other": 2, "rr": 3, "fifo": 3, "deadline": 3}

SchedValue = tuple[str, int, bool]  # (policy name, realtime priority, reset-on-fork)


def sched_text(value: SchedValue) -> str:
    """'idle', 'other', 'fifo:10', 'batch+reset-on-fork'."""
    name, priority, reset = value
    text = f"{name}:{priority}" if name in ("fifo", "rr") else name
    return text + ("+reset-on-fork" if reset else "")


def parse_sched_text(text: str) -> SchedValue:
    reset = text.endswith("+reset-on-fork")
    text = text.removesuffix("+reset-on-fork")
    name, _, priority = text.partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {text!r}")
    return name, int(priority or 0), reset


def boottime_ticks() -> int:
    """Now on the clock of /proc/PID/stat start times (clock ticks since boot, suspend included)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


class SchedActuator(PerThreadActuator[SchedValue]):
    kind = "sched"
    value_key = "sched"

    def __init__(self, procfs: ProcFS, syscalls: Syscalls | None = None):
        super().__init__(procfs, syscalls)

    # -- the knob ---------------------------------------------------------------------------
    def get(self, tid: int) -> SchedValue:
        number = self.syscalls.sched_getscheduler(tid)
        policy = number & ~RESET_ON_FORK
        priority = self.syscalls.sched_getpriority(tid) if policy in (os.SCHED_FIFO, os.SCHED_RR) else 0
        return NAMES.get(policy, f"policy-{policy}"), priority, bool(number & RESET_ON_FORK)

    def set(self, tid: int, value: SchedValue) -> None:
        name, priority, reset = value
        if name not in POLICIES or name == "deadline":
            raise ChangeInvalid(f"thread {tid}: cannot set scheduling policy {sched_text(value)} with sched_setscheduler")
        self.syscalls.sched_setscheduler(tid, POLICIES[name] | (RESET_ON_FORK if reset else 0), priority)

    def call_text(self, value: SchedValue, tid: str = "tid") -> str:
        name, priority, reset = value
        flags = " | SCHED_RESET_ON_FORK" if reset else ""
        return f"sched_setscheduler({tid}, SCHED_{name.upper()}{flags}, {priority})"

    def value_text(self, value: SchedValue) -> str:
        return sched_text(value)

    def to_json(self, value: SchedValue) -> object:
        return sched_text(value)

    def from_json(self, data: object) -> SchedValue:
        return parse_sched_text(str(data))

    def resolve(self, identity: ProcessIdentity, target: dict) -> tuple[SchedValue, str, dict]:
        name = target.get("sched")
        if name not in TARGETS:
            raise ChangeInvalid(f"sched {name!r} is not one of {', '.join(TARGETS)}: nothing changed")
        return (name, 0, False), "", {"born_after": boottime_ticks()}

    def keep(self, current: SchedValue, value: SchedValue) -> bool:
        """Leave a thread already at or below the target (never raise), and realtime threads."""
        return current[0] in REALTIME or RANK.get(current[0], 3) <= RANK[value[0]]

    def rule(self, current: SchedValue, value: SchedValue) -> SchedValue | None:
        return None if self.keep(current, value) else value

    def already_text(self, value: SchedValue) -> str:
        return f"at {sched_text(value)} or lower (or realtime)"

    def explain(self, errno_value: int | None, value: SchedValue) -> str:
        if errno_value in (errno.EPERM, errno.EACCES):
            return "leaving SCHED_IDLE or setting a realtime policy needs CAP_SYS_NICE"
        return ""

    def born_since_value(self, default: SchedValue) -> SchedValue:
        """Never a realtime class for a thread that never held one: a process whose main thread is
        FIFO or RR (rtkit, RLIMIT_RTPRIO) with normal workers would otherwise give realtime to
        every worker born under the change, and to its children (and the shipped unit's
        RestrictRealtime= refuses it, so the entry would never close). SCHED_OTHER instead."""
        return ("other", 0, default[2]) if default[0] in REALTIME else default

    # -- children born under the change -----------------------------------------------------
    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None) -> RestoreResult:
        result = super().restore(identity, original, applied, planned)
        children = self._restore_descendants(identity.pid, original, applied)
        return dataclasses.replace(result, message=f"{result.message}; {children}", restored=True) if children else result

    def _restore_descendants(self, pid: int, original: dict, applied: dict | None) -> str:
        if not applied or "born_after" not in applied or self.value_key not in applied:
            return ""
        ours = self.from_json(applied[self.value_key])
        default = self.born_since_value(self.from_json(original["default"]))
        born_after = int(applied["born_after"])
        restored = threads = 0
        for child in self._descendants_born_since(pid, born_after):
            changed = 0
            for tid in self.procfs.tids(child):
                try:
                    if self.get(tid) != ours:
                        continue  # not ours any more (its own choice, or an operator's): leave it
                    self.set(tid, default)
                    changed += 1
                except (ProcessLookupError, RemediatorError):
                    continue
                except OSError as exc:
                    raise change_error(exc, f"{self.call_text(default, str(tid))} (thread of pid {child}, a child born under the change)") from None
            if changed:
                restored += 1
                threads += changed
        if not restored:
            return ""
        return (
            f"and {self.call_text(default)} on {plural_threads(threads)} of {restored} "
            f"descendant{'s' if restored != 1 else ''} born under the change"
        )

    def _descendants_born_since(self, pid: int, born_after: int) -> list[int]:
        """Processes below pid started at or after born_after (clock ticks since boot).

        A child whose parent exited was re-parented (to init or a subreaper) and is out of reach:
        only the living tree is followed, so a process gone before the revert leaves its orphans."""
        children: dict[int, list[tuple[int, int]]] = {}
        for candidate in self.procfs.pids():
            try:
                stat = self.procfs.stat(candidate)
            except RemediatorError:
                continue
            children.setdefault(stat.ppid, []).append((candidate, stat.start_time))
        found: list[int] = []
        queue = [pid]
        while queue:
            for child, started in children.get(queue.pop(), ()):
                if started >= born_after:
                    found.append(child)
                queue.append(child)  # an older child's own children may be new
        return found


# -- the kind ------------------------------------------------------------------------------------

def thread_sched(procfs: ProcFS, pid: int) -> dict[int, str]:
    """Each thread's scheduling policy by name, read only: field 41 of its stat (no syscall needed)."""
    policies: dict[int, str] = {}
    for tid in sorted(procfs.tids(pid)):
        fields = task_file(procfs, pid, tid, "stat").rsplit(")", 1)[-1].split()
        try:
            number = int(fields[41 - 3])  # fields after the comm start at field 3 (state)
        except (IndexError, ValueError):
            raise RemediatorError(f"pid {pid}: no scheduling policy in /proc/{pid}/task/{tid}/stat") from None
        policies[tid] = NAMES.get(number, f"policy-{number}")
    return policies


class SchedKind(AvailableEverywhere):
    name = "sched"
    group_weighted = True  # SCHED_IDLE/BATCH weigh a thread against the others of its group only
    keys = (Key("sched", "enum", "Set the scheduling policy of every thread: `idle` (SCHED_IDLE: yields to every normal "
                "thread of its scheduling group; like nice, it does not reach other cpu cgroups or sessions) or `batch` "
                "(SCHED_BATCH: no wakeup preemption). Never raises a thread: one already at or below is left.", choices=TARGETS),)

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        return {"sched": action["sched"]}

    def describe(self, params: Mapping[str, Any]) -> str:
        return f"sched {params['sched']}"

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        return {"sched": params["sched"]}, ""

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        target = params["sched"]
        current = thread_sched(host.procfs, pid)
        lowered = {tid: name for tid, name in current.items() if RANK.get(name, 3) > RANK[target] and name not in REALTIME}
        data.update(target=target, threads={str(tid): name for tid, name in current.items()})
        if not lowered:
            return f"no change: every thread already at or below sched {target} ({plural(len(current), 'thread')})"
        text = summarize_threads("sched", lowered, target)
        left = len(current) - len(lowered)
        if left:
            text += f", left as it is on {plural(left, 'thread')} (already at or below, or realtime)"
        return text


SCHED = SchedKind()
