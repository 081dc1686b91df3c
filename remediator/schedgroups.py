"""Scheduling groups: can a nice or sched step on one process affect another at all?

CFS (and EEVDF) share a CPU between scheduling entities of one run queue, each weighted by its
nice (SCHED_IDLE: the lowest weight; SCHED_BATCH: no wakeup preemption). A task group (a cpu
cgroup, or an autogroup) is one entity in its parent's run queue, with its own weight, and its
tasks compete only inside it. So a nice or sched change of a task reaches exactly the tasks of its
own group and of the groups below it: between two services in different cpu cgroups, or two
sessions in different autogroups, it changes nothing.

A process's group, as the kernel places it (kernel/sched/core.c, autogroup.c):
- its cpu cgroup, when that is not the root: v1, the path in the cpu hierarchy; v2, the nearest
  ancestor-or-self whose cgroup.controllers lists cpu (below it the controller is not enabled);
- else, with /proc/sys/kernel/sched_autogroup_enabled = 1, its session's autogroup
  (/proc/PID/autogroup reads "/autogroup-N nice M"; empty for the root's own);
- else the root group.
Written as a string: "/" (root), "/a/b" (a cpu cgroup) or "autogroup-N" (an autogroup, a child of
the root); "" where it could not be read. The collector puts it in ProcessInfo.sched_group; the
pure functions below judge from those strings alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from .actuators import ACTION_KINDS
from .cgroupfs import CgroupFS, CgroupMount, discover_cpu_mount, process_cgroup_path
from .errors import ProcessGone, RemediatorError
from .procfs import CgroupMembership, ProcFS

ROOT = "/"
# How long the kernel's autogroup setting, read for every process in the root cpu group, is taken
# as read: the file costs as much as the process's own cgroup file, and a sysctl changes it rarely.
AUTOGROUP_SETTING_KEPT_S = 5.0
# How long a v2 cgroup's answer to "is cpu enabled here" (its cgroup.controllers) is taken as read:
# a process's group is found by walking up from its cgroup, every info re-check walks again, and
# the processes named in a tick share a few parents (system.slice, user.slice), so each walk read
# the same two or three files. A unit given CPUWeight= (systemd enables the controller then) is
# seen within this long, as a process moved to another cgroup is seen within the re-check's 5 s.
CONTROLLERS_KEPT_S = 5.0
CONTROLLERS_KEPT_MAX = 4096
GROUP_WEIGHTED_KINDS = frozenset(kind.name for kind in ACTION_KINDS if kind.group_weighted)  # nice, sched


# -- the judgement (pure) --------------------------------------------------------------------------

def contains(outer: str, inner: str) -> bool:
    """Is group `inner` the group `outer` or below it (so a task of `outer` competes with it)?"""
    if outer == ROOT:
        return True
    if outer.startswith("autogroup-"):
        return inner == outer
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def can_affect(offender_group: str, protected_group: str) -> bool | None:
    """Can a nice or sched step on a process in `offender_group` change what a process in
    `protected_group` gets? None when either group is unknown."""
    if not offender_group or not protected_group:
        return None
    return contains(offender_group, protected_group)


def describe(group: str) -> str:
    if group == ROOT:
        return "the root scheduling group"
    if group.startswith("autogroup-"):
        return f"{group} (its session's autogroup)"
    return f"cpu cgroup {group}"


def unreachable_reason(step_kind: str, offender: tuple[int, str, str], protected: Iterable[tuple[int, str, str]]) -> str | None:
    """Why a `step_kind` step on the offender cannot affect any protected process, or None when it
    can (or when that cannot be told: a group unknown, nothing protected running). Each process is
    (pid, comm, group)."""
    if step_kind not in GROUP_WEIGHTED_KINDS:
        return None
    pid, comm, group = offender
    known = [entry for entry in protected if entry[2]]
    if not group or not known:
        return None
    if any(can_affect(group, entry[2]) for entry in known):
        return None
    others = "; ".join(f"{c} ({p}) in {describe(g)}" for p, c, g in known[:3]) + (
        f" and {len(known) - 3} more" if len(known) > 3 else "")
    return (f"{step_kind} weighs threads only inside one scheduling group: {comm} ({pid}) is in {describe(group)}, "
            f"the protected {others}")


# -- reading the facts (procfs and cgroupfs, roots as parameters) -----------------------------------

def parse_autogroup(text: str) -> str:
    """'/autogroup-123 nice 0' -> 'autogroup-123'; '' (the root's own autogroup) -> '/'."""
    first = text.split()[0] if text.split() else ""
    return first.lstrip("/") if first.startswith("/autogroup-") else ROOT


class SchedGroups:
    """Reads processes' scheduling groups through a procfs and a cgroupfs (fake trees in tests)."""

    def __init__(self, procfs: ProcFS, cpu_mount: CgroupMount | None, cgroupfs: CgroupFS | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.procfs = procfs
        self.cpu_mount = cpu_mount
        self.cgroupfs = cgroupfs or CgroupFS()
        self.clock = clock
        self._autogroup_setting: tuple[float, bool] | None = None  # (when read, enabled)
        self._cpu_enabled: dict[str, tuple[float, bool]] = {}  # v2 cgroup path -> (when read, cpu listed)

    @classmethod
    def for_host(cls, procfs: ProcFS, cgroupfs: CgroupFS | None = None, mountinfo: str | Path | None = None) -> "SchedGroups":
        cgroupfs = cgroupfs or CgroupFS()
        mount = discover_cpu_mount(mountinfo, cgroupfs) if mountinfo else discover_cpu_mount(cgroupfs=cgroupfs)
        return cls(procfs, mount, cgroupfs)

    def autogroup_enabled(self) -> bool:
        """The kernel's setting, read again at most every AUTOGROUP_SETTING_KEPT_S."""
        now = self.clock()
        if self._autogroup_setting is not None and now - self._autogroup_setting[0] < AUTOGROUP_SETTING_KEPT_S:
            return self._autogroup_setting[1]
        try:
            enabled = (self.procfs.root / "sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        except OSError:
            enabled = False  # a kernel without CONFIG_SCHED_AUTOGROUP
        self._autogroup_setting = (now, enabled)
        return enabled

    def cpu_cgroup(self, pid: int, membership: CgroupMembership | None = None) -> str | None:
        """The process's cpu task group as a cgroup path ("/" at the root), None when unreadable.
        `membership`: its /proc/PID/cgroup as just read, when the caller has it."""
        mount = self.cpu_mount
        if mount is None:
            return ROOT  # no cpu controller: every task is in the root group
        path = process_cgroup_path(mount, membership if membership is not None else self.procfs.cgroups(pid))
        if path is None:
            return ROOT
        path = "/" + path.strip("/")
        if mount.version == 1:
            return path if mount.fs_path(path) is not None else None
        while path != ROOT:  # v2: where the controller is enabled
            enabled = self._cpu_enabled_at(mount, path)
            if enabled is None:
                return None
            if enabled:
                return path
            path = path.rsplit("/", 1)[0] or ROOT
        return ROOT

    def _cpu_enabled_at(self, mount: CgroupMount, path: str) -> bool | None:
        """Whether v2 cgroup `path` lists cpu in its cgroup.controllers (None: unreadable), read
        again at most every CONTROLLERS_KEPT_S."""
        now = self.clock()
        kept = self._cpu_enabled.get(path)
        if kept is not None and now - kept[0] < CONTROLLERS_KEPT_S:
            return kept[1]
        directory = mount.fs_path(path)
        if directory is None:
            return None
        try:
            enabled = "cpu" in self.cgroupfs.read(directory / "cgroup.controllers").split()
        except OSError:
            self._cpu_enabled.pop(path, None)
            return None
        if len(self._cpu_enabled) >= CONTROLLERS_KEPT_MAX:
            self._cpu_enabled.clear()
        self._cpu_enabled[path] = (now, enabled)
        return enabled

    def group_of(self, pid: int, membership: CgroupMembership | None = None) -> str:
        """The process's group ("" when it cannot be read); ProcessGone when it has exited."""
        try:
            cgroup = self.cpu_cgroup(pid, membership)
            if cgroup is None:
                return ""
            if cgroup != ROOT or not self.autogroup_enabled():
                return cgroup
            return parse_autogroup(self.procfs.autogroup(pid))
        except ProcessGone:
            raise
        except RemediatorError:
            return ""
