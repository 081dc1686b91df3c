"""An action kind, said once: each actuators/<kind>.py has one `ActionKind` that the rest of the
pipeline asks about it.

    keys       its keys in a [[policy.actions]] table (schema.py builds the format from them)
    group_weighted  whether it reaches only its own scheduling group (schedgroups.py skips it across)
    compile    its step's parameters from the checker's clean values (policy.py), reporting what
               spans several keys through `Compiling` (file, line and key stay the compiler's)
    describe   the step in words: 'nice 10', 'affinity unprotected'
    target     what the engine asks the actuator for (ActionRequest.params), or why it cannot
    effect     what the step would do to a process on this host now, read only (`policy explain`)
    unavailable  why no step of it can work on this host (`policy check --host`); None from
               `AvailableEverywhere`, for the kinds that need only syscalls every Linux has

and its actuator applies and restores the change (executor.py). Nothing here imports the TOML
stack (policy -> config, schema, tomlpos): the compiler hands in what a kind needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ..cpulist import format_cpulist
from ..errors import translate_os_error
from ..keys import Key
from ..model import CpuSpec
from ..placement import resolve_cpu_spec
from ..procfs import ProcFS

KeyPath = tuple  # a key path below the step's table, e.g. ("cpuset", "cpus")


class Compiling(Protocol):
    """What the policy compiler gives a kind while compiling one step."""

    min_cpus: int  # the policy's limits.min_cpus

    def problem(self, key: KeyPath, message: str, code: str, severity: str = "error") -> None:
        """A located diagnostic at the value of `key` (below the step's table)."""

    def host_cpus(self, key: KeyPath, cpus: frozenset[int]) -> None:
        """Warn about CPUs of `key`'s list that this host lacks (only when the host is known)."""


@dataclass(frozen=True)
class Host:
    """What `policy explain` reads a step's current value through (read only; a fake tree in tests)."""

    procfs: ProcFS
    systemd_host: bool  # systemd manages the cgroups: cgroup steps on v2 go through it
    request_cpus: frozenset[int]
    online_cpus: frozenset[int]


class ActionKind(Protocol):
    """One kind (each kind module has one, registered in actuators/__init__.py)."""

    name: str
    keys: tuple[Key, ...]
    group_weighted: bool  # weighs threads only inside their scheduling group (schedgroups.py)

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        """The step's parameters from its table's clean values (this kind's key is among them)."""

    def describe(self, params: Mapping[str, Any]) -> str:
        """The step in words: 'nice 10', 'cpuset unprotected in cgroup log-shippers'."""

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        """(what the actuator takes, JSON-friendly; "") or (None, why the step cannot be done now)."""

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        """What the step would change on `pid` now, in words; the same as data, added to `data`.
        ProcessGone or RemediatorError when a value cannot be read (the caller says so)."""

    def unavailable(self) -> str | None:
        """Why no step of this kind can work on this host, whatever the process ('not available on
        this host: ...'), or None. A host fact: `policy check --host` says it at every such step."""


class AvailableEverywhere:
    """The `unavailable` of a kind whose steps need only syscalls every Linux host has (setpriority,
    sched_setscheduler, sched_setaffinity): never. A kind that leans on something a host can lack
    (a cgroup controller) writes its own, and the protocol keeps asking every kind for one."""

    def unavailable(self) -> str | None:
        return None


def compile_cpu_spec(value: Any, key: KeyPath, at: Compiling) -> CpuSpec:
    """An affinity or cpuset CPU list (`unprotected`, or CPUs no fewer than min_cpus)."""
    if value == "unprotected":
        return CpuSpec(unprotected=True)
    cpus = frozenset(value)
    if len(cpus) < at.min_cpus:
        at.problem(key, f"{format_cpulist(cpus)} leaves {len(cpus)} CPU{'s' if len(cpus) != 1 else ''}, "
                   f"fewer than limits.min_cpus = {at.min_cpus}", "range")
    else:
        at.host_cpus(key, cpus)
    return CpuSpec(unprotected=False, cpus=cpus)


def task_file(procfs: ProcFS, pid: int, tid: int, name: str) -> str:
    """/proc/PID/task/TID/NAME through `procfs`'s root."""
    path = procfs.root / str(pid) / "task" / str(tid) / name
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise translate_os_error(exc, pid, f"read {path}") from None


def summarize_threads(what: str, current: dict[int, str], target: str) -> str:
    """'nice 0 -> 10 on 2 threads, already 10 on 1 thread', or 'no change: ...'."""
    changing = Counter(value for value in current.values() if value != target)
    same = sum(1 for value in current.values() if value == target)
    if not changing:
        return f"no change: {what} already {target} on {plural(same, 'thread')}"
    parts = [f"{what} {value} -> {target} on {plural(count, 'thread')}" for value, count in sorted(changing.items())]
    if same:
        parts.append(f"already {target} on {plural(same, 'thread')}")
    return ", ".join(parts)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def target_cpus(step: str, spec: CpuSpec, min_cpus: int, request_cpus: frozenset[int],
                online_cpus: frozenset[int]) -> tuple[frozenset[int] | None, str]:
    """The CPUs an affinity or cpuset step (`step`: its words) names now, or None and why it
    cannot be done (fewer than min_cpus: the request CPUs cover the host)."""
    cpus = resolve_cpu_spec(spec, request_cpus, online_cpus)
    if len(cpus) < max(1, min_cpus):
        return None, (f"{step} resolves to {len(cpus)} CPU(s) but the policy leaves the offender at least "
                      f"{min_cpus}: request CPUs cover the host")
    return frozenset(cpus), ""


def effect_cpus(spec: CpuSpec, min_cpus: int, host: Host, data: dict) -> tuple[frozenset[int], str]:
    """For explain: the CPUs the step names on this host, and why it would be skipped ("" if not)."""
    target = resolve_cpu_spec(spec, host.request_cpus, host.online_cpus)
    data["target"] = format_cpulist(target)
    if not target:
        return target, f"skipped: {spec.describe()} resolves to no CPU on this host"
    if len(target) < min_cpus:
        return target, f"skipped: {format_cpulist(target)} is fewer CPUs than limits.min_cpus = {min_cpus}"
    return target, ""
