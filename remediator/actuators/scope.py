"""A transient scope of remediator's own for an offender that belongs to no systemd unit.

On a systemd + cgroup v2 host a cpu or cpuset step changes the offender's unit through systemd.
A process in no unit (left in a cgroup some other tool made, e.g. a container runtime with the
cgroupfs driver, or started by hand into a custom group) has no unit to change, and writing `+cpu`
into the root cgroup and a group of our own behind systemd's back is what the issue forbids. So the
process moves into `remediator-POLICY.scope` (system.slice), a scope systemd starts for us as
`systemd-run --scope` would, and the step becomes that scope's property (CPUWeight, CPUQuota,
AllowedCPUs): systemd knows the group, owns its cgroup files, and keeps them across daemon-reload.

The revert writes the pid back into the cgroup it came from (which is not systemd's: it was in no
unit) and stops the scope once no process is left in it; CollectMode=inactive-or-failed makes
systemd forget it at once.

Never a move out of a cgroup that holds limits (memory.max, pids.max, cpu.max, io.max, a cpuset):
the process would escape them. Never a process under a user's own service manager (user@UID.service).
"""

from __future__ import annotations

import errno
import time

from ..cgroupfs import CgroupFS, CgroupMount, cgroup_pids
from ..errors import ProcessGone
from ..systemd import SystemdError, SystemdManager, unit_for_cgroup
from typing import Callable

from .base import ChangeFailed, ChangeInvalid, RestoreResult, systemd_call

SCOPE_PREFIX = "remediator-"
SCOPE_SLICE = "system.slice"  # where systemd puts a transient scope started by the system manager
# cgroup v2 files whose non-default value is a limit the process would escape by leaving the group.
LIMIT_DEFAULTS = {
    "memory.max": ("max",),
    "memory.high": ("max",),
    "pids.max": ("max",),
    "cpu.max": ("max",),  # "max 100000": the first field is the quota
    "io.max": ("",),
    "cpuset.cpus": ("",),
}
# On cgroup v1 the cpu hierarchy is its own tree: moving a process in it lifts only its quota.
V1_CPU_LIMIT_DEFAULTS = {"cpu.cfs_quota_us": ("-1",)}
# A cpuset step's CPUs are within the process's cpuset already: that one is no limit it lifts.
LIMITS_BESIDE_CPUSET = {name: unlimited for name, unlimited in LIMIT_DEFAULTS.items() if name != "cpuset.cpus"}
SCOPE_PROPERTIES = ("CPUWeight", "CPUQuotaPerSecUSec", "CPUQuotaPeriodUSec", "AllowedCPUs")
# How long systemd may take to move the pid (the start job runs after the D-Bus answer).
SETTLE_S = 5.0


def scope_name(group: str) -> str:
    return f"{SCOPE_PREFIX}{group}.scope"


def scope_cgroup_of(unit: str) -> str:
    return f"/{SCOPE_SLICE}/{unit}"


def scope_of_applied(applied: dict | None) -> str:
    """Our scope from what a step applied: the first step records it, a later step (a property on
    the scope, through the unit path) its unit."""
    applied = applied or {}
    return str(applied.get("scope") or applied.get("unit") or "")


def outside_units(cgroup_path: str) -> tuple[bool, str]:
    """Whether a process in this cgroup is in no system unit and may move into a scope of ours:
    (True, why) for a custom group or the root; (False, why) inside a unit or a user's manager."""
    unit, why = unit_for_cgroup(cgroup_path)
    if unit is not None:
        return False, why
    last = cgroup_path.rstrip("/").rsplit("/", 1)[-1]
    if "user@" in cgroup_path or last.endswith(".slice"):
        return False, why  # a user's manager, or a slice of systemd's own
    return True, why


def limits_in_the_way(cgroupfs: CgroupFS, mount: CgroupMount, cgroup_path: str,
                      defaults: dict[str, tuple[str, ...]] = LIMIT_DEFAULTS) -> list[str]:
    """The limits set on a cgroup or its ancestors below the root ('file=value'): what a process
    moved out of it would escape (`defaults`: each file's values that mean no limit)."""
    found = []
    parts = [part for part in cgroup_path.split("/") if part]
    for depth in range(len(parts), 0, -1):
        directory = mount.fs_path("/" + "/".join(parts[:depth]))
        if directory is None:
            continue
        for name, unlimited in defaults.items():
            try:
                value = cgroupfs.read(directory / name).strip()
            except OSError:
                continue  # that controller is not enabled there: no limit from it
            first = value.split()[0] if value else ""
            if first not in unlimited:
                found.append(f"{directory / name}={value!r}")
    return found


def refuse_lifting_limits(cgroupfs: CgroupFS, mount: CgroupMount, pid: int, cgroup_path: str, destination,
                          defaults: dict[str, tuple[str, ...]] = LIMIT_DEFAULTS, what: str = "limits") -> None:
    """ChangeInvalid when moving `pid` from `cgroup_path` into `destination` would lift a limit of
    its cgroup or an ancestor (limits_in_the_way): it is refused, never taken out of them."""
    limits = limits_in_the_way(cgroupfs, mount, cgroup_path, defaults)
    if limits:
        raise ChangeInvalid(f"pid {pid} is in {cgroup_path}, and moving it into {destination} would lift "
                            f"the {what} of its cgroup ({', '.join(limits)}): nothing changed")


class OffenderScopes:
    """Moves offenders into remediator's transient scopes and gives them back."""

    def __init__(self, systemd: SystemdManager, mount: CgroupMount, cgroupfs: CgroupFS):
        self.systemd = systemd
        self.mount = mount
        self.cgroupfs = cgroupfs

    def limits_in_the_way(self, cgroup_path: str) -> list[str]:
        return limits_in_the_way(self.cgroupfs, self.mount, cgroup_path)

    def check_movable(self, pid: int, cgroup_path: str) -> None:
        movable, why = outside_units(cgroup_path)
        if not movable:
            raise ChangeInvalid(f"{why}: nothing changed")
        limits = self.limits_in_the_way(cgroup_path)
        if limits:
            raise ChangeInvalid(
                f"pid {pid} is in {cgroup_path}, in no systemd unit, and moving it into a scope of remediator's would lift "
                f"the limits of its cgroup ({', '.join(limits)}): nothing changed"
            )

    def is_running(self, unit: str) -> bool:
        return systemd_call(lambda: self.systemd.unit_state(unit)) in ("active", "activating", "reloading")

    def move_in(self, pid: int, unit: str, values: dict[str, int], allowed_cpus: frozenset[int] | None = None) -> bool:
        """Put pid into `unit`: start the scope with the properties, or attach to it when it already
        runs (another offender of the same policy). True when this call started the scope."""
        started = not self.is_running(unit)
        if started:
            systemd_call(lambda: self.systemd.start_transient_scope(
                unit, [pid], values, "remediator: offenders moved here from no unit (reverted by remediator)", allowed_cpus))
        else:
            systemd_call(lambda: self.systemd.attach_processes(unit, [pid]))
        wanted = self.mount.fs_path(scope_cgroup_of(unit))
        deadline = time.monotonic() + SETTLE_S
        while wanted is not None and pid not in self._pids_in(wanted):
            if time.monotonic() > deadline:
                raise ChangeFailed(f"systemd did not move pid {pid} into {unit} within {SETTLE_S:g} s", left_changed=True)
            time.sleep(0.02)
        return started

    def _pids_in(self, directory) -> list[int]:
        try:
            return cgroup_pids(self.cgroupfs, directory)
        except FileNotFoundError:
            return []  # systemd has not made the scope's cgroup yet: its start job runs after the answer

    def give_back(self, pid: int, cgroup_path: str) -> str:
        """Write pid into the cgroup it came from (in no unit: not systemd's to object to)."""
        back = self.mount.fs_path(cgroup_path)
        if back is None:
            raise ChangeFailed(f"the original cgroup {cgroup_path} is outside {self.mount.mount_point}: left in the scope")
        try:
            self.cgroupfs.write(back / "cgroup.procs", str(pid))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone(pid) from None
            raise ChangeFailed(f"write {pid} to {back / 'cgroup.procs'}: {exc.strerror}") from None
        return f"write {pid} to {back / 'cgroup.procs'}"

    def restore(self, pid: int, original_cgroup: str, applied: dict | None, now: str | None,
                after_move: Callable[[], str] = lambda: "") -> RestoreResult:
        """Back from our scope into `original_cgroup`, where it is still in our scope; then stop the
        scope once empty. `after_move` adds what the kind puts back besides (thread masks)."""
        scope = scope_of_applied(applied)
        ours = scope_cgroup_of(scope) if scope else None
        if ours is None or now != ours:
            stopped = self.stop_if_empty(scope) if scope else ""
            if now == original_cgroup:  # the move never happened (an intent without outcome)
                return RestoreResult(f"pid {pid} is in its original cgroup {now}: nothing to restore" + stopped)
            # Someone else moved it since: their decision stands.
            return RestoreResult(f"pid {pid} is in {now}, not in {ours or 'the scope'} where remediator put it: left there" + stopped,
                                 restored=False, left={"cgroup": now, "set": ours})
        text = self.give_back(pid, original_cgroup) + f" (was {now})" + after_move()
        return RestoreResult(text + self.stop_if_empty(scope))

    def stop_if_empty(self, unit: str) -> str:
        """Stop our scope once no process is left in it, and wait until its cgroup is gone."""
        if not unit.startswith(SCOPE_PREFIX) or not unit.endswith(".scope"):
            return ""
        directory = self.mount.fs_path(scope_cgroup_of(unit))
        if directory is None or not self.cgroupfs.exists(directory):
            return ""
        try:
            if cgroup_pids(self.cgroupfs, directory):
                return ""
        except OSError:
            return ""
        try:
            self.systemd.stop_unit(unit)
        except SystemdError as exc:  # the scope may have stopped by itself in between
            if self.cgroupfs.exists(directory):
                return f"; could not stop {unit} ({exc})"
        deadline = time.monotonic() + SETTLE_S
        while self.cgroupfs.exists(directory):
            if time.monotonic() > deadline:
                return f"; {unit} stopped but its cgroup {directory} is still there"
            time.sleep(0.02)
        # A later step's SetUnitProperties --runtime left drop-ins that would outlive the scope.
        return f"; stopped {unit}" + self.systemd.remove_runtime_dropins(unit, SCOPE_PROPERTIES)



def scope_text(scope: str, pid: int, cgroup: str) -> str:
    """For explain: how a process in no unit would get a cgroup step (followed by the properties)."""
    return (f"pid {pid} is in {cgroup}, in no unit: StartTransientUnit {scope} PIDs={pid} (remediator's own scope; "
            "refused if its cgroup holds limits; the revert moves it back and stops the scope) with")
