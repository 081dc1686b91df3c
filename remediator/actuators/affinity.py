"""CPU affinity, on every thread of a process, kept on threads created later.

The target is narrowed to the CPUs the process's cpuset cgroup allows (cpuset.effective_cpus in v1,
cpuset.cpus.effective in v2, online CPUs when there is no cpuset hierarchy): the kernel would refuse
the rest anyway. When nothing is left, or the kernel answers EINVAL, the outcome says so: no silent
fallback to some other mask.

A step never widens a mask (`narrowed_mask`): a thread already within the step's CPUs (pinned to
{1} under a step of {1}, or of {1,2}) is left as it is; one whose mask overlaps the step's CPUs
gets the overlap (narrower, and no CPU it did not have); only a thread that runs on none of the
step's CPUs (pinned to the request CPUs alone, which is the harm the step is for) gets the step's
mask: it is moved, not widened onto any CPU the step keeps it off.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Mapping

from ..cgroupfs import CgroupFS, CgroupMount, allowed_cpus
from ..cpulist import CpuListError, format_cpulist, parse_cpulist
from ..errors import ProcessGone, RemediatorError
from ..keys import Key
from ..procfs import ProcessIdentity, ProcFS
from .base import ChangeInvalid, Syscalls
from .kind import AvailableEverywhere, Compiling, Host, compile_cpu_spec, effect_cpus, summarize_threads, target_cpus, task_file
from .threads import PerThreadActuator


def narrowed_mask(current: frozenset, step: frozenset) -> frozenset | None:
    """The mask a thread on `current` gets from a step of `step`; None to leave it (already within)."""
    if current <= step:
        return None
    return (current & step) or step


class AffinityActuator(PerThreadActuator[frozenset]):
    kind = "affinity"
    value_key = "cpus"

    def __init__(
        self,
        procfs: ProcFS,
        syscalls: Syscalls | None = None,
        *,
        cpuset_mount: CgroupMount | None = None,
        cgroupfs: CgroupFS | None = None,
        sysfs_root: str | Path = "/sys",
    ):
        super().__init__(procfs, syscalls)
        self.cpuset_mount = cpuset_mount
        self.cgroupfs = cgroupfs or CgroupFS()
        self.sysfs_root = sysfs_root

    def get(self, tid: int) -> frozenset:
        return frozenset(self.syscalls.sched_getaffinity(tid))

    def set(self, tid: int, value: frozenset) -> None:
        self.syscalls.sched_setaffinity(tid, value)

    def rule(self, current: frozenset, value: frozenset) -> frozenset | None:
        return narrowed_mask(current, value)

    def already_text(self, value: frozenset) -> str:
        return f"within {{{format_cpulist(value)}}}"

    def call_text(self, value: frozenset, tid: str = "tid") -> str:
        return f"sched_setaffinity({tid}, {{{format_cpulist(value)}}})"

    def value_text(self, value: frozenset) -> str:
        return format_cpulist(value)

    def to_json(self, value: frozenset) -> object:
        return sorted(value)

    def from_json(self, data: object) -> frozenset:
        return frozenset(int(cpu) for cpu in data)  # type: ignore[union-attr]

    def allowed(self, pid: int) -> tuple[frozenset, str]:
        """CPUs the process's cpuset allows, and which cgroup (or 'online CPUs') says so."""
        membership = self.procfs.cgroups(pid)
        return allowed_cpus(self.cgroupfs, self.cpuset_mount, membership, self.sysfs_root)

    def resolve(self, identity: ProcessIdentity, target: dict) -> tuple[frozenset, str, dict]:
        requested_raw = target.get("cpus")
        if not requested_raw:
            raise ChangeInvalid("affinity needs a non-empty CPU set: nothing changed")
        requested = frozenset(int(cpu) for cpu in requested_raw)
        try:
            allowed, source = self.allowed(identity.pid)
        except ProcessGone:
            raise
        except (OSError, RemediatorError) as exc:
            raise ChangeInvalid(f"cannot tell which CPUs pid {identity.pid} may use ({exc}): nothing changed") from None
        value = requested & allowed
        if not value:
            raise ChangeInvalid(
                f"requested CPUs {format_cpulist(requested)} are all outside the CPUs pid {identity.pid} may use "
                f"({source} allows {format_cpulist(allowed)}): nothing changed"
            )
        note = ""
        if value != requested:
            note = f"requested {format_cpulist(requested)}, {source} allows {format_cpulist(allowed)}"
        return value, note, {"requested": sorted(requested)}

    def explain(self, errno_value: int | None, value: frozenset) -> str:
        if errno_value == errno.EINVAL:
            return "the mask holds no CPU this thread may run on (offline, or outside its cpuset)"
        if errno_value in (errno.EPERM, errno.EACCES):
            return "changing another user's thread needs CAP_SYS_NICE"
        return ""


# -- the kind ------------------------------------------------------------------------------------

def thread_affinity(procfs: ProcFS, pid: int, tid: int) -> frozenset[int]:
    """A thread's affinity, read only: Cpus_allowed_list of its status (what sched_getaffinity returns)."""
    for line in task_file(procfs, pid, tid, "status").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            try:
                return parse_cpulist(line.split(":", 1)[1])
            except CpuListError as exc:
                raise RemediatorError(f"pid {pid}: unparsable Cpus_allowed_list: {exc}") from None
    raise RemediatorError(f"pid {pid}: no Cpus_allowed_list in /proc/{pid}/task/{tid}/status")


class AffinityKind(AvailableEverywhere):
    name = "affinity"
    group_weighted = False
    keys = (Key("affinity", "cpus", "Set the CPU affinity of every thread: a CPU list (`\"2-3,6\"`) or `unprotected` "
                "(online CPUs not owned by the request path).", keyword="unprotected"),)

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        return {"cpus": compile_cpu_spec(action["affinity"], ("affinity",), at)}

    def describe(self, params: Mapping[str, Any]) -> str:
        return f"affinity {params['cpus'].describe()}"

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        cpus, why = target_cpus(self.describe(params), params["cpus"], min_cpus, request_cpus, online_cpus)
        return (None, why) if cpus is None else ({"cpus": sorted(cpus)}, "")

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        target, skipped = effect_cpus(params["cpus"], min_cpus, host, data)
        if skipped:
            return skipped
        masks = {tid: format_cpulist(thread_affinity(host.procfs, pid, tid)) for tid in sorted(host.procfs.tids(pid))}
        data["threads"] = {str(tid): mask for tid, mask in masks.items()}
        return summarize_threads("affinity", masks, format_cpulist(target))


AFFINITY = AffinityKind()
