"""Where the request path runs and where offenders may go: request CPUs, `unprotected`, CPU specs.

`unprotected` in a policy is resolved when a step runs, not when the policy is compiled: the
request CPUs may be `auto` (the CPUs the protected processes' cgroups allow) and CPUs go on- and
offline, so the same policy file means the right thing on every host.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

from .matching import PER_USER_SUFFIX
from .model import CpuSpec

# The cpuset actuator creates its cgroups with this prefix (actuators/cpuset.py, cgroup_name).
CGROUP_PREFIX = "remediator-"


def auto_request_cpus(
    protected: Mapping[int, Iterable[int]],
    online: Iterable[int],
    cgroup_cpus: Callable[[int], frozenset[int] | None],
    get_affinity: Callable[[int], Iterable[int]] = os.sched_getaffinity,
) -> frozenset[int]:
    """`request_cpus = "auto"`: the CPUs the protected processes (pid -> tids) may run on.

    From each process's cpuset cgroup first (`cgroup_cpus(pid)`: the unit's AllowedCPUs, the
    cgroup's effective CPUs; None when unknown): that is what the service was given, and no thread
    can widen it. Only for a process whose cgroup allows every online CPU (or cannot be read) do its
    threads' own affinities count; the protected set holds only processes that passed the selectors
    and the users check, so no stranger's affinity gets in. Processes and threads that vanished are
    skipped. `get_affinity` is the read (os.sched_getaffinity by default); `policy explain` passes
    one that reads /proc so it also works against a fake procfs tree.

    The reading stops once the union holds every online CPU: nothing read after can narrow it, and
    a service whose threads are not pinned (the usual case) costs one read, not one per thread
    (500 system calls every few seconds for a 500-thread service, bench/scale.py).
    """
    online = frozenset(online)
    cpus: set[int] = set()
    for pid, tids in protected.items():
        if online <= cpus:
            break
        allowed = cgroup_cpus(pid)
        if allowed is not None and not online <= allowed:
            cpus.update(allowed & online)  # the cgroup restricts the process: its share is the answer
            continue
        for tid in tids:
            try:
                cpus.update(get_affinity(tid))
            except (ProcessLookupError, FileNotFoundError):
                continue  # the thread exited: an ordinary event
            if online <= cpus:
                break
    return frozenset(cpus)


def unprotected_cpus(request_cpus: Iterable[int], online: Iterable[int]) -> frozenset[int]:
    """Online CPUs the request path does not own (may be empty: then `unprotected` steps are skipped)."""
    return frozenset(online) - frozenset(request_cpus)


def resolve_cpu_spec(spec: CpuSpec, request_cpus: Iterable[int], online: Iterable[int]) -> frozenset[int]:
    """The CPUs a step targets now: `unprotected`, or the explicit list restricted to online CPUs."""
    if spec.unprotected:
        return unprotected_cpus(request_cpus, online)
    return spec.cpus & frozenset(online)


def owned_cgroup_name(name: str, uid: int = 0) -> str:
    """'log-shippers' -> 'remediator-log-shippers', the directory the cpuset actuator creates
    (for uid 1000's offenders 'remediator-log-shippers.uid1000', see per_user_name)."""
    return per_user_name(name if name.startswith(CGROUP_PREFIX) else CGROUP_PREFIX + name, uid)


def per_user_name(name: str, uid: int) -> str:
    """The name of a group (or scope) of ours for one user's offenders: root's keeps the plain name,
    any other uid gets '.uidN'. A group's setting (cpu.idle, a weight, a cpuset) reaches every
    process in it, so offenders of two users never share one: a local user's look-alike escalated
    to cpu_idle would idle root's real shipper too, and on systemd the unit-wide step would be
    refused for both (actuators/cpu.py)."""
    return name if uid == 0 else f"{name}.uid{uid}"


def owned_group_path(cgroup_path: str, parent: str = "/") -> bool:
    """Whether a cgroup is one of remediator's: named with its prefix directly under `parent` (the
    hierarchy's root for the cpu groups, the cpuset parent for cpusets), where only root makes
    groups. A delegated subtree (a container's, a user's) can name its own groups anything, deeper
    down: the name alone proves nothing."""
    head, _, name = cgroup_path.rstrip("/").rpartition("/")
    return head == parent.rstrip("/") and name.startswith(CGROUP_PREFIX)


def offenders_group(name: str, uid: int, current_cgroup: str, placed_in: str | None) -> str:
    """The group of ours (`name`, with the prefix) a step puts this offender in: the one an earlier
    step of this kind placed it in (`placed_in`, from the journal) while it is still there, whatever
    its uid is now, so that a later step adds to the earlier ones and never lifts them; else its
    user's (per_user_name). Never the group it is in by its name alone: a child of an offender,
    born in root's group, that runs as another user goes into that user's."""
    here = current_cgroup.rstrip("/").rsplit("/", 1)[-1]
    if placed_in is not None and current_cgroup == placed_in:
        if here == name or (here.startswith(name) and PER_USER_SUFFIX.fullmatch(here[len(name):])):
            return here
    return per_user_name(name, uid)
