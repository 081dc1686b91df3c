"""nice, on every thread of a process.

Linux keeps nice per thread: setpriority(PRIO_PROCESS, pid, n) changes only the thread whose tid is
`pid` (the main thread), so the value is set on each tid in /proc/<pid>/task. New threads inherit
the nice of the thread that creates them; maintain() covers those created by a thread we missed.

A step only ever lowers priority: a thread already at the step's nice or higher (a backup at 19
under a step of 10) is left as it is (`weaker_nice`).
"""

from __future__ import annotations

import errno
from typing import Any, Mapping

from ..keys import Key
from ..procfs import ProcessIdentity, ProcFS
from .base import ChangeInvalid
from .kind import AvailableEverywhere, Compiling, Host, summarize_threads
from .threads import PerThreadActuator

NICE_MIN, NICE_MAX = -20, 19


def weaker_nice(current: int, step: int) -> int | None:
    """The nice a thread at `current` gets from a step of `step`: the weaker priority (the higher
    nice) of the two; None when that is what it has, so nothing is written."""
    return step if step > current else None


class NiceActuator(PerThreadActuator[int]):
    kind = "nice"
    value_key = "nice"

    def get(self, tid: int) -> int:
        return self.syscalls.getpriority(tid)

    def set(self, tid: int, value: int) -> None:
        self.syscalls.setpriority(tid, value)

    def rule(self, current: int, value: int) -> int | None:
        return weaker_nice(current, value)

    def already_text(self, value: int) -> str:
        return f"at nice {value} or weaker"

    def call_text(self, value: int, tid: str = "tid") -> str:
        return f"setpriority(PRIO_PROCESS, {tid}, {value})"

    def value_text(self, value: int) -> str:
        return str(value)

    def to_json(self, value: int) -> object:
        return int(value)

    def from_json(self, data: object) -> int:
        return int(data)  # type: ignore[arg-type]

    def resolve(self, identity: ProcessIdentity, target: dict) -> tuple[int, str, dict]:
        value = target.get("nice")
        if not isinstance(value, int) or isinstance(value, bool) or not NICE_MIN <= value <= NICE_MAX:
            raise ChangeInvalid(f"nice {value!r} is not an integer from {NICE_MIN} to {NICE_MAX}: nothing changed")
        return value, "", {}

    def explain(self, errno_value: int | None, value: int) -> str:
        if errno_value in (errno.EPERM, errno.EACCES):
            return "lowering nice (raising priority) needs CAP_SYS_NICE or RLIMIT_NICE"
        return ""


# -- the kind ------------------------------------------------------------------------------------

def thread_nice(procfs: ProcFS, pid: int) -> dict[int, int]:
    """Each thread's nice, read only: field 19 of its stat (what getpriority returns)."""
    return {tid: procfs.stat(pid, tid).nice for tid in sorted(procfs.tids(pid))}


class NiceKind(AvailableEverywhere):
    name = "nice"
    group_weighted = True  # CFS/EEVDF weigh a thread's nice against the others of its group only
    keys = (Key("nice", "integer", "Set the nice value of every thread (-20..19; higher is gentler to others).",
                minimum=NICE_MIN, maximum=NICE_MAX),)

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        if action["nice"] < 0:
            at.problem(("nice",), f"{action['nice']} raises the process's priority over the default; a remediation step "
                       "normally lowers it (nice > 0)", "nice-raises", severity="warning")
        return {"nice": action["nice"]}

    def describe(self, params: Mapping[str, Any]) -> str:
        return f"nice {params['nice']}"

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        return {"nice": params["nice"]}, ""

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        current = thread_nice(host.procfs, pid)
        data.update(target=params["nice"], threads={str(tid): value for tid, value in current.items()})
        return summarize_threads("nice", {tid: str(value) for tid, value in current.items()}, str(params["nice"]))


NICE = NiceKind()
