"""Confine a process to CPUs with a remediator-owned cpuset cgroup, on cgroup v1 or v2.

cgroup v1 (a `cpuset` hierarchy, e.g. /sys/fs/cgroup/cpuset):
    mkdir <parent>/remediator-<name>; write cpuset.cpus, then cpuset.mems (copied from the parent;
    v1 refuses to move a task into a cpuset whose cpus or mems are empty); write the pid to
    cgroup.procs, which moves every thread of the process.
cgroup v2 (the unified tree, /sys/fs/cgroup on most hosts):
    the controller must be enabled in cgroup.subtree_control of every cgroup from the root down to
    the parent ("+cpuset"), and v2's no-internal-process rule forbids that in a non-root cgroup
    that holds processes of its own: that case is detected before writing and reported (the kernel
    would answer EBUSY). Then mkdir, cpuset.cpus, cpuset.mems, cgroup.procs as in v1.
    Enabling +cpuset is not undone on restore: it changes nothing until a cgroup sets cpuset.cpus,
    and cgroups created since may rely on it.

The original is the process's path in the cpuset hierarchy (from /proc/<pid>/cgroup) and the CPU
mask of each thread: kernels before 6.2 reset thread masks to the cpuset's CPUs when a task moves,
so the masks are put back after moving back. Restore moves the process back only if it is still in
our cgroup and the original cgroup still exists (else it says so and leaves it), then removes our
cgroup once it is empty.

systemd + cgroup v2 (systemd is PID 1): a process belongs to its unit, so the step is the unit's
    runtime AllowedCPUs property, set through systemd (remediator/systemd.py): the process stays in
    its unit, under its unit's limits and `systemctl stop`. The original is the unit's AllowedCPUs
    (journaled like any original) and every thread's mask; restore sets the property back only if
    it still holds the value we set, also after the process has gone (the unit outlives it). The
    change reaches every process of the unit, so the plan names them (`affects`) and the executor
    refuses it when one is off limits. A process in no system unit (a user manager's) is refused:
    on such a host a cgroup of our own would take it out of its unit.

Never wider: a process whose cpuset already allows only CPUs within the step's (a cgroup of its
own with cpuset.cpus 1 under a step of {1}) is not moved; a unit whose AllowedCPUs is already within
the step's is left, one that overlaps it gets the overlap (affinity.narrowed_mask). Restore puts
back a unit's AllowedCPUs, a process's cgroup and the thread masks a move reset only where they
still hold what remediator (or the move) left; what someone else set since stays.

Tested: the v1 path for real (as root, tests/test_cpuset_v1.py); the v2 path against a fake
cgroupfs tree with kernel-like rules (tests/test_cpuset_v2.py), since this test host binds cpuset
to v1. See docs/actuators.md.
"""

from __future__ import annotations

import errno
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..cgroupfs import (
    DEFAULT_MOUNTINFO,
    CgroupFS,
    CgroupMount,
    allowed_cpus,
    cgroup_pids,
    discover_mounts,
    effective_cpus,
    find_cpuset_mount,
    process_cgroup_path,
    subtree_pids,
)
from ..cpulist import CpuListError, format_cpulist, online_cpus, parse_cpulist
from ..errors import ProcessGone, RemediatorError
from ..keys import Key
from ..matching import check_cgroup_name
from ..procfs import ProcessIdentity, ProcFS
from ..placement import CGROUP_PREFIX, offenders_group, owned_cgroup_name, owned_group_path, per_user_name
from ..systemd import SystemdManager, describe_allowed, unit_for_cgroup
from .kind import Compiling, Host, compile_cpu_spec, effect_cpus, target_cpus
from .scope import (LIMITS_BESIDE_CPUSET, OffenderScopes, outside_units, refuse_lifting_limits, scope_cgroup_of, scope_name,
                    scope_of_applied, scope_text)
from .affinity import narrowed_mask
from .base import (
    ActuatorError,
    ApplyResult,
    ChangeFailed,
    ChangeInvalid,
    Plan,
    RestoreResult,
    Syscalls,
    ensure_alive,
    errno_name,
    plural_threads,
    systemd_call,
    thread_values,
    typed_change_error,
)

# How long systemd may take to write a unit's cpuset.cpus after answering SetUnitProperties.
UNIT_REALIZE_TIMEOUT_S = 2.0
KEPT = "the unit keeps the AllowedCPUs remediator set"

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")

# What EBUSY means on each file, and what to do about it.
EBUSY_MEANING = {
    "cgroup.subtree_control": (
        "cgroup v2 will not enable a controller for the children of a non-root cgroup that holds "
        "processes of its own (no-internal-process rule)",
        "move those processes into a leaf cgroup, or configure a cpuset parent that holds no processes",
    ),
    "cgroup.procs": (
        "the target cgroup has controllers enabled for children (cgroup v2 keeps processes in leaf cgroups only)",
        "remove the child controllers from its cgroup.subtree_control or use a leaf cgroup",
    ),
    "cpuset.cpus": (
        "the CPUs are held exclusively by another cpuset (cpu_exclusive or a v2 partition)",
        "pick CPUs outside the exclusive cpusets",
    ),
    "rmdir": (
        "the cgroup still holds processes or child cgroups",
        "move them out first",
    ),
}


def cgroup_name(requested: str) -> str:
    """The remediator-owned cgroup name for a policy's name ('log-shippers' -> 'remediator-log-shippers')."""
    name = owned_cgroup_name(requested)
    if not NAME_PATTERN.match(name) or name in (".", ".."):
        raise ChangeInvalid(f"cgroup name {requested!r} is not a plain name (letters, digits, '.', '_', '-'): nothing changed")
    return name


CPU_IDLE_MISSING = "this kernel has no cpu.idle (Linux 5.15 and later have it); a cpu_weight step works here"


def explain_write_error(exc: OSError, path: Path, value: str) -> str:
    """One line: which file, what the errno means there, what to do."""
    call = f'write "{value}" to {path}' if value else f"rmdir {path}"
    key = path.name if value else "rmdir"
    if exc.errno == errno.EBUSY and key in EBUSY_MEANING:
        meaning, remedy = EBUSY_MEANING[key]
        return f"{call} failed with EBUSY: {meaning}; {remedy}"
    if exc.errno == errno.ENOSPC and path.name == "cgroup.procs":
        return f"{call} failed with ENOSPC: the cgroup's cpuset.cpus or cpuset.mems is empty, so it cannot take tasks"
    if exc.errno == errno.ENOENT and path.name == "cpu.idle":
        return f"{call} failed with ENOENT: {CPU_IDLE_MISSING}"
    if exc.errno == errno.EINVAL and path.name in ("cpuset.cpus", "cpuset.mems"):
        return f"{call} failed with EINVAL: the value is not within the parent cgroup's {path.name}"
    return f"{call} failed with {errno_name(exc)} ({exc.strerror or exc})"


def write_error(exc: OSError, path: Path, value: str) -> ActuatorError:
    """A failed cgroupfs write as a typed error, with what it means for that file."""
    return typed_change_error(exc, explain_write_error(exc, path, value))


@dataclass(frozen=True)
class Step:
    action: str  # "mkdir" | "write"
    path: Path
    value: str = ""

    def to_json(self) -> dict:
        return {"action": self.action, "path": str(self.path), "value": self.value}

    @classmethod
    def from_json(cls, data: dict) -> "Step":
        return cls(data["action"], Path(data["path"]), data.get("value", ""))


def describe_steps(steps: list[Step]) -> str:
    """'mkdir /x/remediator-a; write "1" to .../cpuset.cpus; ...' (a directory named once, then '...')."""
    named: set[Path] = set()
    parts = []
    for step in steps:
        if step.action == "mkdir":
            parts.append(f"mkdir {step.path}")
            named.add(step.path)
            continue
        where = f".../{step.path.name}" if step.path.parent in named else str(step.path)
        named.add(step.path.parent)
        parts.append(f'write "{step.value}" to {where}')
    return "; ".join(parts)


# What a cgroup holds for a controller's files until someone sets them (cgroup-v2.rst).
CONTROLLER_DEFAULTS = {"cpu": {"cpu.weight": "100", "cpu.idle": "0", "cpu.max": "max"}}


def give_back_controller(cgroupfs: CgroupFS, controller: str, enabled: list[str]) -> str:
    """Take back "+CONTROLLER" from the cgroup.subtree_control files remediator wrote it to (the
    directories in `enabled`, deepest first), where nothing below uses it since: no child hands it
    on, no group of remediator's is left, and every child still holds the defaults. Otherwise it
    stays, and the note says where and why. Returns "; ..." notes, or "" when there was nothing."""
    notes = []
    for directory in map(Path, reversed(enabled)):
        control = directory / "cgroup.subtree_control"
        try:
            if controller not in cgroupfs.read(control).split():
                continue
            children = [directory / name for name in cgroupfs.listdir(directory) if cgroupfs.exists(directory / name / "cgroup.procs")]
            user = next((child for child in children if _uses_controller(cgroupfs, child, controller)), None)
            if user is not None:
                notes.append(f"+{controller} stays in {control} ({user} uses it)")
                break  # the levels above hand it down to this one
            cgroupfs.write(control, "-" + controller)
            notes.append(f"write -{controller} to {control} (as before remediator)")
        except OSError as exc:
            notes.append(f"+{controller} stays in {control} ({exc.strerror})")
            break
    return "".join("; " + note for note in notes)


def _uses_controller(cgroupfs: CgroupFS, child: Path, controller: str) -> bool:
    if child.name.startswith(CGROUP_PREFIX) or controller in cgroupfs.read(child / "cgroup.subtree_control").split():
        return True
    for name, default in CONTROLLER_DEFAULTS.get(controller, {}).items():
        try:
            value = cgroupfs.read(child / name).strip()
        except FileNotFoundError:
            continue  # cpu.idle before Linux 5.15
        if value.split()[0] != default:
            return True
    return False


def enable_controller_steps(cgroupfs: CgroupFS, mount: CgroupMount, parent: str, controller: str) -> list[Step]:
    """cgroup v2: "+CONTROLLER" in cgroup.subtree_control from the root down to `parent`, where
    missing; refused before any write where the no-internal-process rule would answer EBUSY."""
    chain = ["/"]
    for part in parent.strip("/").split("/"):
        if part:
            chain.append(chain[-1].rstrip("/") + "/" + part)
    steps: list[Step] = []
    for cgroup in chain:
        directory = mount.fs_path(cgroup)
        assert directory is not None
        try:
            enabled = cgroupfs.read(directory / "cgroup.subtree_control").split()
        except OSError as exc:
            raise ChangeFailed(f"cannot read {directory}/cgroup.subtree_control ({exc.strerror}): nothing changed") from None
        if controller in enabled:
            continue
        if not steps:
            # The topmost cgroup missing it must at least be offered the controller.
            try:
                available = cgroupfs.read(directory / "cgroup.controllers").split()
            except OSError:
                available = []
            if controller not in available:
                raise ChangeFailed(
                    f"{controller} is not available in {directory} (cgroup.controllers: {' '.join(available) or 'empty'}); "
                    "it may be bound to a cgroup v1 hierarchy: nothing changed"
                )
        if cgroup != "/":
            holders = cgroup_pids(cgroupfs, directory)
            if holders:
                shown = ", ".join(str(pid) for pid in holders[:5]) + (", ..." if len(holders) > 5 else "")
                raise ChangeFailed(
                    f"cannot enable {controller} in {directory}/cgroup.subtree_control: {directory} holds processes "
                    f"({shown}), and cgroup v2 gives no controllers to the children of a non-root cgroup with "
                    "processes of its own (no-internal-process rule; the write would fail with EBUSY); "
                    f"configure a {controller} parent that holds no processes: nothing changed"
                )
        steps.append(Step("write", directory / "cgroup.subtree_control", "+" + controller))
    return steps


class CpusetActuator:
    kind = "cpuset"

    def __init__(
        self,
        procfs: ProcFS,
        *,
        mount: CgroupMount | None,
        cgroupfs: CgroupFS | None = None,
        syscalls: Syscalls | None = None,
        parent: str = "/",
        sysfs_root: str | Path = "/sys",
        systemd: SystemdManager | None = None,
    ):
        self.systemd = systemd  # set on a systemd host: units are changed through it
        self.procfs = procfs
        self.mount = mount
        self.cgroupfs = cgroupfs or CgroupFS()
        self.syscalls = syscalls or Syscalls()
        self.parent = "/" + parent.strip("/")
        self.sysfs_root = sysfs_root

    # -- read ---------------------------------------------------------------------------------
    def _require_mount(self) -> CgroupMount:
        if self.mount is None:
            raise ChangeFailed(
                "no cpuset controller here: no cgroup v1 cpuset hierarchy is mounted and no cgroup v2 tree "
                "lists cpuset in cgroup.controllers (see /proc/self/mountinfo): nothing changed"
            )
        return self.mount

    def read(self, pid: int) -> dict:
        mount = self._require_mount()
        path = process_cgroup_path(mount, self.procfs.cgroups(pid))
        if path is None:
            raise ChangeFailed(f"pid {pid} has no place in the cpuset hierarchy at {mount.mount_point}: nothing changed")
        masks, default = thread_values(self.procfs, pid, self.syscalls.sched_getaffinity)
        current = {
            "cgroup": path,
            **mount.to_json(),
            "threads": {str(tid): sorted(mask) for tid, mask in masks.items()},
            "default": sorted(default),
            "uid": self.procfs.uid(pid),  # whose offender: a group of ours holds one user's (placement.per_user_name)
        }
        if self.systemd is not None and mount.version == 2:
            unit, why = unit_for_cgroup(path)
            if unit is None:
                # In no unit: it moves into a transient scope of ours (actuators/scope.py).
                self._scopes().check_movable(pid, path)
                current["outside_units"] = True
                return current
            current["unit"] = unit
            current["unit_cgroup"] = path.split(unit, 1)[0] + unit
            current["allowed_cpus"] = systemd_call(lambda: self.systemd.get_allowed_cpus(unit))
            current["runtime_dropins"] = self.systemd.runtime_dropins(unit, ("AllowedCPUs",))
        return current

    def _await_unit_cpus(self, original: dict, wanted: str) -> str:
        """Wait until systemd has written the unit's cpuset.cpus: it answers the D-Bus call first
        and realizes the cgroup later from its event loop, and a thread mask set before that
        would be cut down to the old CPUs. '' when it is in place, else what is there."""
        unit_dir = self._mount_of(original).fs_path(original.get("unit_cgroup", ""))
        if unit_dir is None or not self.cgroupfs.exists(unit_dir / "cgroup.procs"):
            return ""  # the unit is stopped: nothing to wait for
        deadline = time.monotonic() + UNIT_REALIZE_TIMEOUT_S
        while True:
            # No cpuset.cpus (systemd has not enabled the controller there, or no longer needs
            # it) means no restriction.
            now = self._read_cpus_text(unit_dir / "cpuset.cpus") or ""
            if now == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return "" if now == wanted else f'; {unit_dir}/cpuset.cpus still reads "{now}" after {UNIT_REALIZE_TIMEOUT_S:g} s'

    def _read_cpus_text(self, path: Path) -> str | None:
        try:
            return format_cpulist(parse_cpulist(self.cgroupfs.read(path)))
        except (OSError, CpuListError):
            return None

    # -- plan ---------------------------------------------------------------------------------
    def _read_cpus(self, path: Path) -> frozenset[int]:
        try:
            return parse_cpulist(self.cgroupfs.read(path))
        except (OSError, CpuListError):
            return frozenset()

    def _parent_mems(self, mount: CgroupMount, parent_dir: Path) -> str:
        if mount.version == 1:
            for name in ("cpuset.mems", "cpuset.effective_mems"):
                try:
                    value = self.cgroupfs.read(parent_dir / name).strip()
                except OSError:
                    continue
                if value:
                    return value
            return ""
        directory = parent_dir
        while True:
            try:
                value = self.cgroupfs.read(directory / "cpuset.mems.effective").strip()
                if value:
                    return value
            except OSError:
                pass
            if directory == mount.mount_point:
                return ""
            directory = directory.parent

    def plan(
        self, identity: ProcessIdentity, target: dict, current: dict, *, original: dict | None = None, applied: dict | None = None
    ) -> Plan:
        mount = self._require_mount()
        requested_name, uid = cgroup_name(str(target.get("cgroup") or "")), int(current.get("uid", 0))
        name = offenders_group(requested_name, uid, current["cgroup"], (applied or {}).get("cgroup"))
        requested = frozenset(int(cpu) for cpu in target.get("cpus") or ())
        if not requested:
            raise ChangeInvalid("cpuset needs a non-empty CPU set: nothing changed")
        if "unit" in current:
            return self._plan_unit(identity, target, current, mount, requested)
        if current.get("outside_units"):
            return self._plan_scope(identity, target, current, mount, requested,
                                    scope_name(per_user_name(requested_name, uid).removeprefix(CGROUP_PREFIX)))
        parent_dir = mount.fs_path(self.parent)
        if parent_dir is None or not self.cgroupfs.exists(parent_dir):
            raise ChangeFailed(f"cpuset parent cgroup {self.parent} does not exist under {mount.mount_point}: nothing changed")
        target_path = self.parent.rstrip("/") + "/" + name
        target_dir = parent_dir / name

        found = effective_cpus(self.cgroupfs, mount, self.parent)
        allowed, source = found if found else (online_cpus(self.sysfs_root), "online CPUs")
        cpus = requested & allowed
        if not cpus:
            raise ChangeInvalid(
                f"requested CPUs {format_cpulist(requested)} are all outside what cpuset parent {source} allows "
                f"({format_cpulist(allowed)}): nothing changed"
            )
        if current["cgroup"] != target_path and not owned_group_path(current["cgroup"], self.parent):
            # Never wider: a cpuset that already allows only some of these CPUs stays (not one of ours:
            # moving between our own cgroups is a later step's business; one named like ours deeper
            # down, in a container's subtree, is not ours).
            now = effective_cpus(self.cgroupfs, mount, current["cgroup"])
            if now is not None and now[0] <= cpus:
                description = (
                    f"pid {identity.pid} is in {current['cgroup']}, whose cpuset ({now[1]}) allows {format_cpulist(now[0])}, "
                    f"already within {format_cpulist(cpus)}: not moved"
                )
                return Plan(self.kind, identity, current, target, description, unchanged=True)
            if now is not None:
                cpus &= now[0]  # never wider: only CPUs its cpuset allows now
                if not cpus:
                    raise ChangeInvalid(f"pid {identity.pid} is in {current['cgroup']}, whose cpuset ({now[1]}) allows "
                                        f"{format_cpulist(now[0])}, none of {format_cpulist(requested & allowed)}: moving it "
                                        "would widen it; nothing changed")
            if mount.version == 2:
                # One tree for every controller: out of its cgroup, it would leave its memory.max,
                # pids.max and cpu.max behind (a container's, or a supervisor's).
                refuse_lifting_limits(self.cgroupfs, mount, identity.pid, current["cgroup"], target_dir, LIMITS_BESIDE_CPUSET)
        mems = self._parent_mems(mount, parent_dir)
        if not mems:
            raise ChangeFailed(f"cannot read the memory nodes of {parent_dir} (cpuset.mems): nothing changed")

        steps: list[Step] = enable_controller_steps(self.cgroupfs, mount, self.parent, "cpuset") if mount.version == 2 else []
        exists = self.cgroupfs.exists(target_dir)
        previous_cpus = self._read_cpus(target_dir / "cpuset.cpus") if exists else frozenset()
        if not exists:
            steps.append(Step("mkdir", target_dir))
        if previous_cpus != cpus:
            steps.append(Step("write", target_dir / "cpuset.cpus", format_cpulist(cpus)))
        if not exists or not self._cgroup_file_has_value(target_dir / "cpuset.mems"):
            steps.append(Step("write", target_dir / "cpuset.mems", mems))
        if current["cgroup"] != target_path:
            steps.append(Step("write", target_dir / "cgroup.procs", str(identity.pid)))

        threads = len(current.get("threads", {}))
        if not steps:
            description = f"pid {identity.pid} is already in {target_dir} with CPUs {format_cpulist(cpus)}"
            return Plan(self.kind, identity, current, target, description, unchanged=True)
        description = f"{describe_steps(steps)} (was {current['cgroup']})"
        if cpus != requested:
            description += f"; requested {format_cpulist(requested)}, {source} allows {format_cpulist(allowed)}"
        details = {
            "steps": [step.to_json() for step in steps],
            "cgroup": target_path,
            "cpus": sorted(cpus),
            "mems": mems,
            "created": not exists,
            "previous_cpus": format_cpulist(previous_cpus) if exists else None,
            "requested": sorted(requested),
        }
        expected = {"cgroup": target_path, "cpus": sorted(cpus), "mems": mems, "requested": sorted(requested)}
        return Plan(self.kind, identity, current, target, description, threads=threads, details=details, expected=expected)

    def _plan_unit(self, identity: ProcessIdentity, target: dict, current: dict, mount: CgroupMount, requested: frozenset[int]) -> Plan:
        unit = current["unit"]
        online = online_cpus(self.sysfs_root)
        cpus = requested & online
        if not cpus:
            raise ChangeInvalid(f"requested CPUs {format_cpulist(requested)} are not online ({format_cpulist(online)}): nothing changed")
        unit_dir = mount.fs_path(current["unit_cgroup"])
        members = tuple(subtree_pids(self.cgroupfs, unit_dir)) if unit_dir is not None else ()
        threads = len(current.get("threads", {}))
        # Never wider: "" (no restriction) is every online CPU; a unit already within the step's
        # CPUs stays as it is, one that overlaps them gets the overlap.
        try:
            now = parse_cpulist(current["allowed_cpus"]) if current["allowed_cpus"] else online
        except CpuListError:
            now = online
        narrowed = narrowed_mask(now, cpus)
        if narrowed is None:
            description = f"{unit} already has {describe_allowed(current['allowed_cpus'])}, within {format_cpulist(cpus)}: left as it is"
            return Plan(self.kind, identity, current, target, description, unchanged=True, affects=members, affects_foreign_group=True)
        cpus = narrowed
        wanted = format_cpulist(cpus)
        call = f"systemd SetUnitProperties {unit} --runtime AllowedCPUs={wanted}"
        others = len(members) - 1
        description = f"{call} (was {describe_allowed(current['allowed_cpus'])})"
        if others > 0:
            description += f"; the unit's {others} other process{'es' if others != 1 else ''} too"
        if cpus != requested & online:
            description += f"; requested {format_cpulist(requested)}, the overlap with the unit's AllowedCPUs"
        elif cpus != requested:
            description += f"; requested {format_cpulist(requested)}, online {format_cpulist(online)}"
        details = {"unit": unit, "allowed_cpus": wanted, "cpus": sorted(cpus), "requested": sorted(requested)}
        expected = {"unit": unit, "allowed_cpus": wanted, "requested": sorted(requested)}
        return Plan(self.kind, identity, current, target, description, threads=threads, details=details, expected=expected, affects=members, affects_foreign_group=True)

    def _scopes(self) -> OffenderScopes:
        assert self.systemd is not None
        return OffenderScopes(self.systemd, self._require_mount(), self.cgroupfs)

    def _plan_scope(self, identity: ProcessIdentity, target: dict, current: dict, mount: CgroupMount,
                    requested: frozenset[int], scope: str) -> Plan:
        online = online_cpus(self.sysfs_root)
        cpus = requested & online
        if not cpus:
            raise ChangeInvalid(f"requested CPUs {format_cpulist(requested)} are not online ({format_cpulist(online)}): nothing changed")
        # Never wider: a group that already allows only some of these CPUs keeps the process.
        now = effective_cpus(self.cgroupfs, mount, current["cgroup"])
        if now is not None and now[0] <= cpus:
            description = (f"pid {identity.pid} is in {current['cgroup']}, whose cpuset ({now[1]}) allows {format_cpulist(now[0])}, "
                           f"already within {format_cpulist(cpus)}: not moved")
            return Plan(self.kind, identity, current, target, description, unchanged=True)
        wanted = format_cpulist(cpus)
        description = (f"systemd StartTransientUnit {scope} (or AttachProcessesToUnit when it runs) PIDs={identity.pid} "
                       f"AllowedCPUs={wanted} (was in {current['cgroup']}, in no unit)")
        details = {"scope": scope, "allowed_cpus": wanted, "cpus": sorted(cpus), "requested": sorted(requested)}
        expected = {"cgroup": scope_cgroup_of(scope), "scope": scope, "allowed_cpus": wanted, "requested": sorted(requested)}
        threads = len(current.get("threads", {}))
        return Plan(self.kind, identity, current, target, description, threads=threads, details=details, expected=expected)

    def _cgroup_file_has_value(self, path: Path) -> bool:
        try:
            return bool(self.cgroupfs.read(path).strip())
        except OSError:
            return False

    # -- apply --------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        details = plan.details
        if "scope" in details:
            scope, cpus = details["scope"], frozenset(details["cpus"])
            if not self._scopes().move_in(plan.identity.pid, scope, {}, allowed_cpus=cpus):
                # A running scope of the same policy: narrow it where it allows more, never widen.
                text = systemd_call(lambda: self.systemd.get_allowed_cpus(scope))
                narrowed = narrowed_mask(parse_cpulist(text) if text else online_cpus(self.sysfs_root), cpus)
                if narrowed is not None:
                    systemd_call(lambda: self.systemd.set_allowed_cpus(scope, narrowed))
            ensure_alive(self.procfs, plan.identity)
            applied = {"cgroup": scope_cgroup_of(scope), "scope": scope, "allowed_cpus": details["allowed_cpus"],
                       "requested": details["requested"]}
            return ApplyResult(applied=applied, message=plan.description, threads=plan.threads)
        if "unit" in details:
            unit = details["unit"]
            systemd_call(lambda: self.systemd.set_allowed_cpus(unit, frozenset(details["cpus"])))
            note = self._await_unit_cpus(plan.current, details["allowed_cpus"])
            ensure_alive(self.procfs, plan.identity)
            applied = {"unit": unit, "allowed_cpus": details["allowed_cpus"], "requested": details["requested"]}
            return ApplyResult(applied=applied, message=plan.description + note, threads=plan.threads)
        steps = [Step.from_json(step) for step in details["steps"]]
        done: list[Step] = []
        for step in steps:
            try:
                if step.action == "mkdir":
                    self.cgroupfs.mkdir(step.path)
                else:
                    self.cgroupfs.write(step.path, step.value)
            except OSError as exc:
                if exc.errno == errno.ESRCH and step.path.name == "cgroup.procs":
                    self._roll_back(done, details)
                    raise ProcessGone(plan.identity.pid) from None
                error = write_error(exc, step.path, step.value if step.action == "write" else "")
                error.message += self._roll_back(done, details)
                error.args = (error.message,)
                raise error from None
            done.append(step)
        ensure_alive(self.procfs, plan.identity)
        message = plan.description
        previous = plan.current.get("cgroup")
        if previous != details["cgroup"] and previous and owned_group_path(previous, self.parent):
            # A later step moved it from one of our cgroups to another: the old one may be empty now.
            message += self._cleanup_note(self._require_mount(), previous)
        applied = {
            "cgroup": details["cgroup"],
            "cpus": details["cpus"],
            "mems": details["mems"],
            "created": details["created"],
            "enabled": [str(step.path.parent) for step in steps if step.path.name == "cgroup.subtree_control"],
            "requested": details["requested"],
        }
        return ApplyResult(applied=applied, message=message, threads=plan.threads)

    def _roll_back(self, done: list[Step], details: dict) -> str:
        """Undo a half-made change (the process was not moved yet); '+cpuset' stays, see the docstring."""
        notes = []
        for step in reversed(done):
            try:
                if step.action == "mkdir":
                    self.cgroupfs.rmdir(step.path)
                    notes.append(f"removed {step.path}")
                elif step.path.name == "cpuset.cpus" and details.get("previous_cpus"):
                    self.cgroupfs.write(step.path, details["previous_cpus"])
                    notes.append(f"put back cpuset.cpus {details['previous_cpus']}")
            except OSError as exc:
                notes.append(f"could not undo {step.action} {step.path} ({exc.strerror})")
        return "; " + ", ".join(notes) if notes else "; nothing was changed"

    # -- restore ------------------------------------------------------------------------------
    @staticmethod
    def _mount_of(original: dict) -> CgroupMount:
        # The hierarchy recorded with the change, not today's discovery: restore what was changed.
        return CgroupMount(int(original["version"]), Path(original["mount"]), original.get("root", "/"), frozenset({"cpuset"}))

    @staticmethod
    def _ours(key: str, applied: dict | None, planned: dict | None) -> list:
        """The values of `key` remediator may have left: the applied one, and the planned one of a
        step whose outcome is unknown."""
        return [record[key] for record in (applied, planned) if record and record.get(key) is not None]

    def _restore_unit(self, original: dict, applied: dict | None, planned: dict | None = None) -> tuple[str, bool, dict | None]:
        """Give the unit its AllowedCPUs back, unless someone changed it since we set it:
        (what was done, whether the property was restored, what was left to someone else)."""
        unit = original["unit"]
        ours = self._ours("allowed_cpus", applied, planned)
        if self.systemd is None:
            raise ChangeFailed(f"{unit}: systemd is not reachable from here, so its AllowedCPUs stays {' or '.join(ours) or 'as it is'}")
        now = systemd_call(lambda: self.systemd.get_allowed_cpus(unit), KEPT)
        before = original["allowed_cpus"]
        if now == before:
            return f"{unit} already has its original {describe_allowed(now)}: nothing to restore", False, None
        if now not in ours:
            left = {"unit": unit, "now": now, "set": ours[-1] if ours else None}
            return f"{unit} has {describe_allowed(now)}, not the {' or '.join(ours) or 'value'} remediator set: left as it is", False, left
        systemd_call(lambda: self.systemd.set_allowed_cpus(unit, parse_cpulist(before) if before else frozenset()), KEPT)
        note = self._await_unit_cpus(original, before)
        if "AllowedCPUs" not in original.get("runtime_dropins", ("AllowedCPUs",)):
            note += self.systemd.remove_runtime_dropins(unit, ("AllowedCPUs",))
        return f"systemd SetUnitProperties {unit} --runtime {describe_allowed(before)} (was AllowedCPUs={now}){note}", True, None

    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None) -> RestoreResult:
        pid = identity.pid
        if "unit" in original:
            message, restored, left = self._restore_unit(original, applied, planned)
            if restored:  # kernels before 6.2 reset the masks when the unit's CPUs changed
                message += self._restore_masks(identity, original)
            ensure_alive(self.procfs, identity)
            return RestoreResult(message, restored=left is None, left=left)
        if original.get("outside_units"):
            return self._restore_from_scope(identity, original, applied if applied is not None else planned)
        mount = self._mount_of(original)
        candidates = self._ours("cgroup", applied, planned)
        now = process_cgroup_path(mount, self.procfs.cgroups(pid))
        if now not in candidates:
            cleanup = "".join(self._cleanup_note(mount, ours) for ours in dict.fromkeys(candidates))
            if now == original["cgroup"] or not candidates:
                # The move never happened (an intent without outcome): nothing to put back.
                return RestoreResult(f"pid {pid} is in its original cgroup {now}: nothing to restore" + cleanup)
            # Someone else moved it since: their decision stands.
            left = {"cgroup": now, "set": candidates[-1]}
            return RestoreResult(f"pid {pid} is in {now}, not in {' or '.join(candidates)}: left there" + cleanup, restored=False, left=left)
        ours = now
        original_dir = mount.fs_path(original["cgroup"])
        if original_dir is None or not self.cgroupfs.exists(original_dir):
            raise ChangeFailed(
                f"original cgroup {original['cgroup']} no longer exists under {mount.mount_point}: "
                f"pid {pid} stays in {ours}",
                closes_entry=True,
            )
        procs = original_dir / "cgroup.procs"
        try:
            self.cgroupfs.write(procs, str(pid))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone(pid) from None
            raise write_error(exc, procs, str(pid)) from None
        message = f'write "{pid}" to {procs} (was {ours})'
        message += self._restore_masks(identity, original)
        ensure_alive(self.procfs, identity)
        return RestoreResult(message + self._cleanup_note(mount, ours))

    def _restore_from_scope(self, identity: ProcessIdentity, original: dict, applied: dict | None) -> RestoreResult:
        now = process_cgroup_path(self._mount_of(original), self.procfs.cgroups(identity.pid))
        result = self._scopes().restore(identity.pid, original["cgroup"], applied, now,
                                        after_move=lambda: self._restore_masks(identity, original))
        ensure_alive(self.procfs, identity)
        return result

    def _restore_masks(self, identity: ProcessIdentity, original: dict) -> str:
        """Put back thread masks a pre-6.2 kernel reset on the move (a no-op where it kept them).

        A reset leaves a thread on every CPU its cpuset allows now; a thread on any other mask than
        that or its original was set by someone else since (a taskset after ours): it is left."""
        if "threads" not in original:
            return ""
        masks = {int(tid): frozenset(mask) for tid, mask in original["threads"].items()}
        default = frozenset(original.get("default") or ())
        try:
            reset_to: frozenset | None = allowed_cpus(
                self.cgroupfs, self._mount_of(original), self.procfs.cgroups(identity.pid), self.sysfs_root
            )[0]
        except (OSError, CpuListError, RemediatorError):
            reset_to = None  # cannot tell a reset from a taskset: put the originals back, as before
        fixed, failed, others = 0, 0, 0
        for tid in sorted(self.procfs.tids(identity.pid)):
            wanted = masks.get(tid, default)
            if not wanted:
                continue
            try:
                now = frozenset(self.syscalls.sched_getaffinity(tid))
                if now == wanted:
                    continue
                if reset_to is not None and now != reset_to:
                    others += 1
                    continue
                self.syscalls.sched_setaffinity(tid, wanted)
                fixed += 1
            except ProcessLookupError:
                continue
            except OSError:
                failed += 1
        note = ""
        if fixed:
            note += f"; sched_setaffinity back to the original mask on {plural_threads(fixed)}"
        if failed:
            note += f"; could not put back the original mask on {plural_threads(failed)}"
        if others:
            note += f"; {plural_threads(others)} on a mask someone else set since: left as {'they are' if others != 1 else 'it is'}"
        return note

    def _cleanup_note(self, mount: CgroupMount, ours: str | None) -> str:
        if not ours:
            return ""
        directory = mount.fs_path(ours)
        if directory is None or not directory.name.startswith(CGROUP_PREFIX):
            return ""  # only ever remove our own cgroups
        if not self.cgroupfs.exists(directory):
            return ""
        try:
            holders = cgroup_pids(self.cgroupfs, directory)
        except OSError:
            holders = []
        if holders:
            return f"; {directory} kept ({len(holders)} other process{'es' if len(holders) != 1 else ''} in it)"
        try:
            self.cgroupfs.rmdir(directory)
        except OSError as exc:
            return "; " + explain_write_error(exc, directory, "")
        return f"; rmdir {directory}"

    def cleanup(self, original: dict, applied: dict | None) -> str:
        """After the process left: remove our cgroup if nothing else is in it."""
        if original and "unit" in original:
            # The unit outlives the process: its property is given back all the same. A systemd
            # that cannot be asked now raises, and the entry stays for another attempt.
            return self._restore_unit(original, applied)[0]
        if not original or "mount" not in original:
            return ""
        if original.get("outside_units"):
            scope = scope_of_applied(applied)
            return self._scopes().stop_if_empty(scope).lstrip("; ") if scope and self.systemd is not None else ""
        return self._cleanup_note(self._mount_of(original), (applied or {}).get("cgroup")).lstrip("; ")

    def maintain(
        self, identity: ProcessIdentity, original: dict, applied: dict, known_tids: set[int], noticed: set[int] | None = None,
        *, journalled: dict | None = None,
    ) -> None:
        return None  # new threads start in their creator's cgroup: nothing to follow up


# -- the kind ------------------------------------------------------------------------------------

def cpuset_steps_unavailable(mounts: list[CgroupMount]) -> str | None:
    """Why no cpuset step can work on a host with these cgroup mounts (`discover_mounts`: v2 trees with
    their root's cgroup.controllers), or None where `find_cpuset_mount` finds the hierarchy that
    `default_actuators` hands the actuator."""
    if find_cpuset_mount(mounts) is not None:
        return None
    if not mounts:
        return f"not available on this host: no cgroup filesystem is mounted (no cgroup or cgroup2 line in {DEFAULT_MOUNTINFO})"
    reasons = []
    v1 = [",".join(sorted(mount.controllers)) or str(mount.mount_point) for mount in mounts if mount.version == 1]
    if v1:
        reasons.append(f"no cgroup v1 cpuset hierarchy is mounted (v1 hierarchies: {'; '.join(v1)})")
    for mount in mounts:
        if mount.version == 2:
            listed = " ".join(sorted(mount.controllers)) or "nothing"
            reasons.append(f"the cgroup v2 tree at {mount.mount_point} does not list cpuset in cgroup.controllers (it lists: {listed})")
    return "not available on this host: " + ", and ".join(reasons)


CPUSET_KEYS = (
    Key("cpus", "cpus", "CPUs of the cgroup: a CPU list or `unprotected`.", required=True, keyword="unprotected"),
    Key("cgroup", "string", "Name of the remediator-owned cpuset cgroup (created as `remediator-NAME`, `remediator-NAME.uidN` for uid N's offenders): letters, digits, `.`, `_`, `-`, not ending in `.uid` and digits.",
        required=True, pattern=r"^[A-Za-z0-9_.-]+$", pattern_hint="letters, digits, '.', '_', '-'", item_check=check_cgroup_name),
)


class CpusetKind:
    name = "cpuset"
    group_weighted = False
    keys = (Key("cpuset", "table", "Move the process into a remediator-owned cpuset cgroup.", keys=CPUSET_KEYS,
                example='cpuset = { cpus = "unprotected", cgroup = "log-shippers" }'),)

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        table = action["cpuset"]
        return {"cpus": compile_cpu_spec(table["cpus"], ("cpuset", "cpus"), at), "cgroup": table["cgroup"]}

    def describe(self, params: Mapping[str, Any]) -> str:
        return f"cpuset {params['cpus'].describe()} in cgroup {params['cgroup']}"

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        cpus, why = target_cpus(self.describe(params), params["cpus"], min_cpus, request_cpus, online_cpus)
        return (None, why) if cpus is None else ({"cgroup": params["cgroup"], "cpus": sorted(cpus)}, "")

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        unavailable = self.unavailable()  # no cpuset hierarchy: no move or unit property to describe
        if unavailable:
            return unavailable
        target, skipped = effect_cpus(params["cpus"], min_cpus, host, data)
        if skipped:
            return skipped
        cpus = format_cpulist(target)
        membership = host.procfs.cgroups(pid)
        if host.systemd_host and "cpuset" not in membership.v1_paths and membership.v2_path:
            unit, why = unit_for_cgroup(membership.v2_path)
            data.update(cgroup=membership.v2_path, unit=unit)
            if unit:
                return (f"cpuset through systemd: SetUnitProperties {unit} --runtime AllowedCPUs={cpus} "
                        "(the process stays in its unit; every process of the unit gets it)")
            if outside_units(membership.v2_path)[0]:
                scope = owned_cgroup_name(params["cgroup"], host.procfs.uid(pid)) + ".scope"
                return f"cpuset through systemd: {scope_text(scope, pid, membership.v2_path)} AllowedCPUs={cpus}"
            return f"refused on this systemd host: {why}"
        current = membership.v1_paths.get("cpuset") or membership.v2_path or "/"
        name = owned_cgroup_name(params["cgroup"], host.procfs.uid(pid))
        data.update(cgroup=current, target_cgroup=name)
        if current.rstrip("/").endswith("/" + name):
            return f"cpuset: already in {current}; cpus {cpus}"
        return f"cpuset: move from {current} to {name} with cpus {cpus}"

    def unavailable(self) -> str | None:
        try:
            mounts = discover_mounts()
        except OSError as exc:
            return f"not available on this host: cannot read {exc.filename or DEFAULT_MOUNTINFO} ({exc.strerror}) to find a cpuset hierarchy"
        return cpuset_steps_unavailable(mounts)


CPUSET = CpusetKind()
