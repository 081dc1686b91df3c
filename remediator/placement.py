"""Where the request path runs and where offenders may go: request CPUs, `unprotected`, CPU specs.

`unprotected` in a policy is resolved when a step runs, not when the policy is compiled: the
request CPUs may be `auto` (the union of the protected threads' allowed CPUs) and CPUs go on- and
offline, so the same policy file means the right thing on every host.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from .policy import CpuSpec

# The cpuset actuator creates its cgroups with this prefix (actuators/cpuset.py, cgroup_name).
CGROUP_PREFIX = "remediator-"


def auto_request_cpus(
    protected_tids: Iterable[int], get_affinity: Callable[[int], Iterable[int]] = os.sched_getaffinity
) -> frozenset[int]:
    """The union of the allowed CPUs of the protected threads; threads that vanished are skipped.

    `get_affinity` is the read (os.sched_getaffinity by default); `policy explain` passes one that
    reads /proc so it also works against a fake procfs tree.
    """
    cpus: set[int] = set()
    for tid in protected_tids:
        try:
            cpus.update(get_affinity(tid))
        except (ProcessLookupError, FileNotFoundError):
            continue  # the thread exited: an ordinary event
    return frozenset(cpus)


def unprotected_cpus(request_cpus: Iterable[int], online: Iterable[int]) -> frozenset[int]:
    """Online CPUs the request path does not own (may be empty: then `unprotected` steps are skipped)."""
    return frozenset(online) - frozenset(request_cpus)


def resolve_cpu_spec(spec: CpuSpec, request_cpus: Iterable[int], online: Iterable[int]) -> frozenset[int]:
    """The CPUs a step targets now: `unprotected`, or the explicit list restricted to online CPUs."""
    if spec.unprotected:
        return unprotected_cpus(request_cpus, online)
    return spec.cpus & frozenset(online)


def owned_cgroup_name(name: str) -> str:
    """'log-shippers' -> 'remediator-log-shippers', the directory the cpuset actuator creates."""
    return name if name.startswith(CGROUP_PREFIX) else CGROUP_PREFIX + name
