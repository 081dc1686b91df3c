"""Actuators: one kernel knob each (read, apply, restore), plus dry-run twins; each module is one
action kind, all of it (its keys, step, words, request, explain: see kind.py).

    nice      setpriority(PRIO_PROCESS, tid, n) on every thread
    sched     sched_setscheduler(tid, SCHED_IDLE or SCHED_BATCH) on every thread, never a raise
    affinity  sched_setaffinity(tid, cpus) on every thread, kept on new threads
    cpu       the cgroup's cpu controller (cpu_weight, cpu_idle, cpu_max): the unit's runtime
              properties through systemd (v2), or a remediator-owned group (v1, or v2 without systemd)
    cpuset    a remediator-owned cpuset cgroup (v1, or v2 without systemd), or the unit's
              AllowedCPUs through systemd (v2 with systemd)

Side effects go through two thin objects, `Syscalls` and `cgroupfs.CgroupFS`, so tests can record
calls and inject errno values. Only the executor calls these; see remediator/executor.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..cgroupfs import DEFAULT_MOUNTINFO, CgroupFS, CgroupMount, discover_cpu_mount, discover_cpuset_mount
from ..procfs import ProcFS
from ..systemd import SystemdManager, systemd_is_init
from .affinity import AFFINITY, AffinityActuator
from .base import (
    Actuator,
    ActuatorError,
    ApplyResult,
    ChangeDenied,
    ChangeFailed,
    ChangeInvalid,
    DryRun,
    MaintainResult,
    Plan,
    RestoreResult,
    Syscalls,
)
from .cpu import CPU, CpuActuator
from .cpuset import CPUSET, CpusetActuator
from .kind import ActionKind, Compiling, Host
from .nice import NICE, NiceActuator
from .sched import SCHED, SchedActuator

# In the order their keys appear in the format (schema.py) and its reference.
ACTION_KINDS: tuple[ActionKind, ...] = (NICE, SCHED, AFFINITY, CPU, CPUSET)
KINDS = tuple(kind.name for kind in ACTION_KINDS)
_BY_NAME = {kind.name: kind for kind in ACTION_KINDS}


def kind_of(name: str) -> ActionKind:
    """The kind named `name` (KeyError for one that does not exist)."""
    return _BY_NAME[name]


def kind_for_action(action: Mapping[str, Any]) -> ActionKind:
    """The kind whose key a step's table holds (the format allows exactly one)."""
    return next(kind for kind in ACTION_KINDS if any(key.name in action for key in kind.keys))

_UNSET = object()


def default_actuators(
    procfs: ProcFS,
    *,
    syscalls: Syscalls | None = None,
    cgroupfs: CgroupFS | None = None,
    cpuset_mount: CgroupMount | None | object = _UNSET,
    mountinfo_path: str | Path = DEFAULT_MOUNTINFO,
    cpuset_parent: str = "/",
    sysfs_root: str | Path = "/sys",
    systemd: SystemdManager | None | object = _UNSET,
    cpu_mount: CgroupMount | None | object = _UNSET,
) -> dict[str, Actuator]:
    """The three real actuators, the cpuset hierarchy discovered from mountinfo unless given."""
    syscalls = syscalls or Syscalls()
    cgroupfs = cgroupfs or CgroupFS()
    mount = discover_cpuset_mount(mountinfo_path, cgroupfs) if cpuset_mount is _UNSET else cpuset_mount
    cpu_hierarchy = discover_cpu_mount(mountinfo_path, cgroupfs) if cpu_mount is _UNSET else cpu_mount
    if systemd is _UNSET:
        # On a systemd host with cgroup v2, a unit's processes are changed through systemd.
        systemd = SystemdManager() if mount is not None and mount.version == 2 and systemd_is_init() else None
    return {
        "nice": NiceActuator(procfs, syscalls),
        "sched": SchedActuator(procfs, syscalls),
        "affinity": AffinityActuator(procfs, syscalls, cpuset_mount=mount, cgroupfs=cgroupfs, sysfs_root=sysfs_root),
        "cpu": CpuActuator(procfs, mount=cpu_hierarchy, cgroupfs=cgroupfs, systemd=systemd),
        "cpuset": CpusetActuator(
            procfs, mount=mount, cgroupfs=cgroupfs, syscalls=syscalls, parent=cpuset_parent, sysfs_root=sysfs_root,
            systemd=systemd,
        ),
    }


def dry_run_twins(actuators: dict[str, Actuator]) -> dict[str, DryRun]:
    return {kind: actuator if isinstance(actuator, DryRun) else DryRun(actuator) for kind, actuator in actuators.items()}


__all__ = [
    "ACTION_KINDS",
    "KINDS",
    "ActionKind",
    "Actuator",
    "ActuatorError",
    "AffinityActuator",
    "ApplyResult",
    "ChangeDenied",
    "ChangeFailed",
    "ChangeInvalid",
    "Compiling",
    "CpuActuator",
    "CpusetActuator",
    "DryRun",
    "Host",
    "MaintainResult",
    "NiceActuator",
    "SchedActuator",
    "Plan",
    "RestoreResult",
    "Syscalls",
    "default_actuators",
    "dry_run_twins",
    "kind_for_action",
    "kind_of",
]
