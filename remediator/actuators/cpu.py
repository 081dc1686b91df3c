"""The cpu controller of the offender's cgroup: weight, idle, bandwidth (`cpu_weight`, `cpu_idle`, `cpu_max`).

Nice and SCHED_* weigh threads inside one group; a cgroup's weight weighs the group against its
siblings, which is where a systemd host puts a service and a sidecar (each its own unit). So:

- cgroup v2 under systemd, the process in a system unit: the unit's runtime properties through
  systemd's D-Bus API, as `systemctl set-property --runtime` does: CPUWeight (0 is systemd's "idle",
  written as cpu.idle = 1), CPUQuotaPerSecUSec and CPUQuotaPeriodUSec. The process stays in its unit;
  every process of the unit gets it, and the executor refuses when one of them is off limits.
- cgroup v1 (no systemd managing it): the process moves into `remediator-POLICY` in the cpu
  hierarchy with cpu.shares (weight x 1024 / 100), cpu.idle or cpu.cfs_quota_us/cpu.cfs_period_us;
  restore moves it back and removes the group once empty.
- cgroup v2 under systemd, the process in no unit (a group another tool made): it moves into a
  transient scope of remediator's, `remediator-POLICY.scope`, started with the properties
  (actuators/scope.py); restore writes it back where it was and stops the scope once empty.
- cgroup v2 without systemd (no SystemdManager: systemd is not PID 1, as `default_actuators`
  decides): as on v1, the process moves into `remediator-POLICY`, a child of the root, with
  cpu.weight, cpu.idle or cpu.max ("QUOTA PERIOD", one write); first "+cpu" goes into the root's
  cgroup.subtree_control where missing (cpuset's enable_controller_steps; the root is exempt from
  the no-internal-process rule, and our group is a leaf). The journal keeps where "+cpu" was
  written, and once our group is removed "-cpu" takes it back, unless a cgroup made or set since
  uses it (a group of remediator's, a child handing it on, a child's cpu.weight/cpu.idle/cpu.max
  off their defaults): "+cpu" makes each child of the root its own scheduling group of weight 100,
  where before every thread competed alone, so it is not left on behind the host's back. Never a raise by the
  move: a process whose cgroup (or an ancestor below the root) already gives as little (cpu.idle 1,
  a weight or a cpu.max as low) stays where it is, and one whose cgroup holds limits (memory.max,
  pids.max, cpu.max, io.max, a cpuset: scope.limits_in_the_way; on v1, where the cpu hierarchy is a
  tree of its own, cpu.cfs_quota_us) is refused rather than moved out.

One kind, "cpu": a later step adds its setting on top of the earlier ones (cpu_weight, then
cpu_idle), and the journal keeps the original from before the first, so a revert gives back every
property (or the cgroup) as it was. Never a raise: a weight is only ever lowered, a quota only
tightened, and idle stays idle. A group of our own reaches every process in it: they are the plan's
`affects`, so the executor refuses the change when one of them is protected, PID 1 or the daemon.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..cgroupfs import CgroupFS, CgroupMount, cgroup_pids, discover_cpu_mount, process_cgroup_path, subtree_pids
from ..durations import parse_duration
from ..errors import ProcessGone
from ..keys import Key
from ..placement import offenders_group, owned_cgroup_name, per_user_name
from ..procfs import ProcessIdentity, ProcFS
from ..systemd import SystemdManager, unit_for_cgroup
from .base import ActuatorError, ApplyResult, ChangeFailed, ChangeInvalid, Plan, RestoreResult, ensure_alive, systemd_call
from .cpuset import CPU_IDLE_MISSING, enable_controller_steps, give_back_controller, write_error
from .kind import Compiling, Host
from .scope import (V1_CPU_LIMIT_DEFAULTS, OffenderScopes, outside_units, refuse_lifting_limits, scope_cgroup_of, scope_name,
                    scope_of_applied, scope_text)

CGROUP_PREFIX = "remediator-"
UNSET = 2**64 - 1  # systemd's "not set" for CPUWeight, "no quota" for CPUQuotaPerSecUSec
IDLE_WEIGHT = 0  # systemd's CGROUP_WEIGHT_IDLE: cpu.idle = 1
PROPERTIES = ("CPUWeight", "CPUQuotaPerSecUSec", "CPUQuotaPeriodUSec")
V1_SHARES_PER_WEIGHT = 1024 / 100  # cpu.weight 100 is cpu.shares 1024
KEPT = "left as it is"


def setting_text(setting: dict) -> str:
    """'cpu_weight 10', 'cpu_idle', 'cpu_max 50000us/100000us'."""
    if setting.get("idle"):
        return "cpu_idle"
    if "weight" in setting:
        return f"cpu_weight {setting['weight']}"
    return f"cpu_max {setting['quota_us']}us/{setting['period_us']}us"


def property_text(name: str, value: int) -> str:
    if value == UNSET:
        return f"{name}=[not set]"
    if name == "CPUWeight" and value == IDLE_WEIGHT:
        return "CPUWeight=idle"
    if name == "CPUQuotaPerSecUSec":
        return f"CPUQuota={value / 10000:g}%"
    if name == "CPUQuotaPeriodUSec":
        return f"CPUQuotaPeriodSec={value}us"
    return f"{name}={value}"


def _weaker_properties(current: dict[str, int], setting: dict) -> dict[str, int]:
    """The properties to set for `setting` that lower the unit's CPU; {} when it already has as little."""
    wanted: dict[str, int] = {}
    weight = current.get("CPUWeight", UNSET)
    if setting.get("idle"):
        if weight != IDLE_WEIGHT:
            wanted["CPUWeight"] = IDLE_WEIGHT
    elif "weight" in setting:
        effective = 100 if weight == UNSET else weight
        if weight != IDLE_WEIGHT and setting["weight"] < effective:
            wanted["CPUWeight"] = setting["weight"]
    else:
        per_second = setting["quota_us"] * 1_000_000 // setting["period_us"]
        if current.get("CPUQuotaPerSecUSec", UNSET) > per_second:
            wanted["CPUQuotaPerSecUSec"] = per_second
            wanted["CPUQuotaPeriodUSec"] = setting["period_us"]
    return wanted


def _v1_writes(setting: dict, directory: Path, read) -> list[tuple[Path, str]]:
    """The cpu controller files to write in our v1 group for `setting`, never a raise."""
    if setting.get("idle"):
        return [] if read(directory / "cpu.idle") == "1" else [(directory / "cpu.idle", "1")]
    if "weight" in setting:
        shares = max(2, round(setting["weight"] * V1_SHARES_PER_WEIGHT))
        now = read(directory / "cpu.shares")
        return [] if now.isdigit() and int(now) <= shares else [(directory / "cpu.shares", str(shares))]
    quota, period = setting["quota_us"], setting["period_us"]
    now_quota, now_period = read(directory / "cpu.cfs_quota_us"), read(directory / "cpu.cfs_period_us")
    if now_quota.lstrip("-").isdigit() and now_period.isdigit() and int(now_quota) > 0:
        if int(now_quota) * period <= quota * int(now_period):
            return []  # already as tight
    # The period first: a quota is checked against the period in place.
    return [(directory / "cpu.cfs_period_us", str(period)), (directory / "cpu.cfs_quota_us", str(quota))]


V2_DEFAULTS = {"cpu.weight": "100", "cpu.idle": "0", "cpu.max": "max 100000"}


def _v2_writes(setting: dict, directory: Path, read) -> list[tuple[Path, str]]:
    """The cpu controller files to write in our v2 group for `setting`, never a raise ('' reads as
    the kernel's default: a group not made yet)."""
    def value(name: str) -> str:
        return read(directory / name) or V2_DEFAULTS[name]

    idle = value("cpu.idle") == "1"
    if setting.get("idle"):
        return [] if idle else [(directory / "cpu.idle", "1")]
    if "weight" in setting:
        if idle:
            return []  # idle stays idle (and the kernel refuses a weight on an idle group: EINVAL)
        now = value("cpu.weight")
        return [] if now.isdigit() and int(now) <= setting["weight"] else [(directory / "cpu.weight", str(setting["weight"]))]
    quota, period = setting["quota_us"], setting["period_us"]
    if _quota_within(value("cpu.max"), quota, period):
        return []
    return [(directory / "cpu.max", f"{quota} {period}")]  # both in one write: checked together


def _quota_within(cpu_max: str, quota: int, period: int) -> bool:
    """Whether a v2 cpu.max ('20000 100000', 'max 100000') already allows no more than quota/period."""
    fields = cpu_max.split()
    return len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[0]) * period <= quota * int(fields[1])


def _as_little_on_v2(cgroupfs: CgroupFS, mount: CgroupMount, cgroup_path: str, setting: dict) -> str:
    """Where the process's v2 cgroup (or an ancestor below the root) already gives it as little as
    `setting` ('cpu.idle=1 in /sys/fs/cgroup/a'); '' when none does. Moving it out would be a raise."""
    parts = [part for part in cgroup_path.split("/") if part]
    for depth in range(len(parts), 0, -1):
        directory = mount.fs_path("/" + "/".join(parts[:depth]))
        if directory is None:
            continue

        def read(name: str) -> str:
            try:
                return cgroupfs.read(directory / name).strip()
            except OSError:
                return ""  # the controller is not enabled there

        if read("cpu.idle") == "1" and "quota_us" not in setting:
            return f"cpu.idle=1 in {directory}"
        weight = read("cpu.weight")
        if "weight" in setting and weight.isdigit() and int(weight) <= setting["weight"]:
            return f"cpu.weight={weight} in {directory}"
        cpu_max = read("cpu.max")
        if "quota_us" in setting and _quota_within(cpu_max, setting["quota_us"], setting["period_us"]):
            return f"cpu.max={cpu_max!r} in {directory}"
    return ""


class CpuActuator:
    kind = "cpu"

    def __init__(self, procfs: ProcFS, *, mount: CgroupMount | None, cgroupfs: CgroupFS | None = None,
                 systemd: SystemdManager | None = None):
        self.procfs = procfs
        self.mount = mount
        self.cgroupfs = cgroupfs or CgroupFS()
        self.systemd = systemd
        self.scopes = OffenderScopes(systemd, mount, self.cgroupfs) if systemd is not None and mount is not None and mount.version == 2 else None

    # -- read ---------------------------------------------------------------------------------
    def read(self, pid: int) -> dict:
        mount = self.mount
        if mount is None:
            raise ChangeFailed("no cpu controller here: no cgroup v1 cpu hierarchy and no cgroup v2 tree with cpu: nothing changed")
        path = process_cgroup_path(mount, self.procfs.cgroups(pid))
        if path is None:
            raise ChangeFailed(f"pid {pid} has no place in the cpu hierarchy at {mount.mount_point}: nothing changed")
        # Whose offender: a group of ours holds one user's offenders only (placement.per_user_name).
        current = {"cgroup": path, **mount.to_json(), "uid": self.procfs.uid(pid)}
        if mount.version == 2:
            if self.systemd is None:
                return current  # no manager owns the tree: a group of our own, as on v1
            unit, why = unit_for_cgroup(path)
            if unit is None:
                assert self.scopes is not None
                self.scopes.check_movable(pid, path)
                current["outside_units"] = True
                return current
            current["unit"] = unit
            current["unit_cgroup"] = path.split(unit, 1)[0] + unit
            current["properties"] = systemd_call(lambda: self.systemd.get_unit_properties(unit, PROPERTIES))
            current["runtime_dropins"] = self.systemd.runtime_dropins(unit, PROPERTIES)
        return current

    def _read(self, path: Path) -> str:
        try:
            return self.cgroupfs.read(path).strip()
        except OSError:
            return ""

    # -- plan ---------------------------------------------------------------------------------
    def plan(
        self, identity: ProcessIdentity, target: dict, current: dict, *, original: dict | None = None, applied: dict | None = None
    ) -> Plan:
        setting = target.get("cpu")
        if not isinstance(setting, dict) or not setting:
            raise ChangeInvalid(f"cpu step without a setting ({target!r}): nothing changed")
        if "unit" in current:
            return self._plan_unit(identity, target, current, setting)
        group = str(target.get("group") or "")
        if not group or "/" in group or group in (".", ".."):
            raise ChangeInvalid(f"cpu step needs a group name, not {group!r}: nothing changed")
        if current.get("outside_units"):
            return self._plan_scope(identity, target, current, setting, scope_name(per_user_name(group, int(current.get("uid", 0)))))
        mount = self.mount
        assert mount is not None
        name = offenders_group(CGROUP_PREFIX + group, int(current.get("uid", 0)), current["cgroup"], (applied or {}).get("cgroup"))
        directory = mount.mount_point / name
        moving = current["cgroup"] != "/" + name
        enable: list = []
        if mount.version == 2:
            if moving:
                held = _as_little_on_v2(self.cgroupfs, mount, current["cgroup"], setting)
                if held:
                    return Plan(self.kind, identity, current, target,
                                f"pid {identity.pid} is in {current['cgroup']}, which already has {held}, as little as {setting_text(setting)}: not moved",
                                unchanged=True)
                refuse_lifting_limits(self.cgroupfs, mount, identity.pid, current["cgroup"], directory)
            # Our group is a child of the root, which the no-internal-process rule exempts.
            enable = enable_controller_steps(self.cgroupfs, mount, "/", "cpu")
        elif moving:
            # A container's --cpus or a unit's CPUQuota= on a v1 host: out of its group, it would be lifted.
            refuse_lifting_limits(self.cgroupfs, mount, identity.pid, current["cgroup"], directory, V1_CPU_LIMIT_DEFAULTS, "quota")
        writes_for = _v2_writes if mount.version == 2 else _v1_writes
        exists = self.cgroupfs.exists(directory)
        writes = writes_for(setting, directory, self._read) if exists else writes_for(setting, directory, lambda path: "")
        if not writes and not moving:
            return Plan(self.kind, identity, current, target, f"pid {identity.pid} is already in {directory} with {setting_text(setting)} or less", unchanged=True)
        parts = [f"write {step.value} to {step.path}" for step in enable]
        parts += ([f"mkdir {directory}"] if not exists else []) + [f"write {value} to {path}" for path, value in writes]
        if moving:
            parts.append(f"write {identity.pid} to {directory / 'cgroup.procs'}")
        description = f"{', '.join(parts)} (was {current['cgroup']})"
        # Where remediator wrote "+cpu" (now or for an earlier step), to take it back with the group.
        enabled = [*(applied or {}).get("enabled", ()), *(str(step.path.parent) for step in enable)]
        details = {"directory": str(directory), "cgroup": "/" + name, "created": not exists,
                   "enable": [[str(step.path), step.value] for step in enable], "enabled": enabled,
                   "writes": [[str(path), value] for path, value in writes], "move": moving}
        expected = {"cgroup": "/" + name, "setting": setting, "enabled": enabled}
        # The group's settings reach every offender already in it: none may be off limits.
        members = tuple(cgroup_pids(self.cgroupfs, directory)) if exists else ()
        return Plan(self.kind, identity, current, target, description, details=details, expected=expected,
                    affects=tuple(dict.fromkeys((identity.pid, *members))))

    def _plan_unit(self, identity: ProcessIdentity, target: dict, current: dict, setting: dict) -> Plan:
        unit = current["unit"]
        properties = {name: int(value) for name, value in current["properties"].items()}
        unit_dir = self.mount.fs_path(current["unit_cgroup"]) if self.mount else None
        members = tuple(subtree_pids(self.cgroupfs, unit_dir)) if unit_dir is not None else ()
        wanted = _weaker_properties(properties, setting)
        if not wanted:
            text = ", ".join(property_text(name, properties.get(name, UNSET)) for name in PROPERTIES)
            return Plan(self.kind, identity, current, target, f"{unit} already has as little CPU as {setting_text(setting)} ({text})",
                        unchanged=True, affects=members, affects_foreign_group=True)
        assignments = " ".join(property_text(name, value) for name, value in wanted.items())
        was = " ".join(property_text(name, properties.get(name, UNSET)) for name in wanted)
        description = f"systemd SetUnitProperties {unit} --runtime {assignments} (was {was})"
        others = len(members) - 1
        if others > 0:
            description += f"; the unit's {others} other process{'es' if others != 1 else ''} too"
        details = {"unit": unit, "set": wanted}
        expected = {"unit": unit, "properties": {**properties, **wanted}}
        return Plan(self.kind, identity, current, target, description, details=details, expected=expected, affects=members, affects_foreign_group=True)

    def _plan_scope(self, identity: ProcessIdentity, target: dict, current: dict, setting: dict, scope: str) -> Plan:
        wanted = _weaker_properties({}, setting)
        if not wanted:
            return Plan(self.kind, identity, current, target, f"{setting_text(setting)} is no less than a new scope's default: nothing to do",
                        unchanged=True)
        assignments = " ".join(property_text(name, value) for name, value in wanted.items())
        description = (f"systemd StartTransientUnit {scope} (or AttachProcessesToUnit when it runs) PIDs={identity.pid} "
                       f"{assignments} (was in {current['cgroup']}, in no unit)")
        details = {"scope": scope, "set": wanted}
        expected = {"cgroup": scope_cgroup_of(scope), "scope": scope, "properties": wanted}
        return Plan(self.kind, identity, current, target, description, details=details, expected=expected)

    # -- apply --------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> ApplyResult:
        details = plan.details
        if "scope" in details:
            assert self.scopes is not None
            scope = details["scope"]
            started = self.scopes.move_in(plan.identity.pid, scope, details["set"])
            if not started:  # a running scope of the same policy: lower it where it has more, never raise
                now = systemd_call(lambda: self.systemd.get_unit_properties(scope, PROPERTIES))
                lower = _weaker_properties(now, plan.target["cpu"])
                if lower:
                    systemd_call(lambda: self.systemd.set_unit_properties(scope, lower))
            ensure_alive(self.procfs, plan.identity)
            applied = {"cgroup": scope_cgroup_of(scope), "scope": scope, "properties": details["set"]}
            return ApplyResult(applied=applied, message=plan.description)
        if "unit" in details:
            unit = details["unit"]
            systemd_call(lambda: self.systemd.set_unit_properties(unit, details["set"]))
            ensure_alive(self.procfs, plan.identity)
            applied = {"unit": unit, "properties": {**plan.current["properties"], **details["set"]}}
            return ApplyResult(applied=applied, message=plan.description)
        directory = Path(details["directory"])
        created = False
        path, value = directory, ""
        try:
            for path, value in details.get("enable", ()):
                self.cgroupfs.write(Path(path), value)
            path, value = directory, ""
            if details["created"]:
                self.cgroupfs.mkdir(directory)
                created = True
            for path, value in details["writes"]:
                self.cgroupfs.write(Path(path), value)
            if details["move"]:
                path, value = directory / "cgroup.procs", str(plan.identity.pid)
                self.cgroupfs.write(path, value)
        except OSError as exc:
            gone, undo = self._remove_if_empty(directory) if created else (False, "")
            if not created or gone:
                undo += give_back_controller(self.cgroupfs, "cpu", [str(Path(path).parent) for path, _ in details.get("enable", ())])
            if exc.errno == errno.ESRCH:
                raise ProcessGone(plan.identity.pid) from None
            if self._mount_of(plan.current).version == 2:
                error = write_error(exc, Path(path), value)
                error.message += undo or "; nothing was moved"
                error.args = (error.message,)
                raise error from None
            why = f": {CPU_IDLE_MISSING}" if exc.errno == errno.ENOENT and Path(path).name == "cpu.idle" else ""
            raise ChangeFailed(f"{exc.filename or directory}: {errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc.strerror}){why}"
                               f"{undo or '; nothing was moved'}") from None
        ensure_alive(self.procfs, plan.identity)
        applied = {"cgroup": details["cgroup"], "created": details["created"], "setting": plan.target.get("cpu"),
                   "enabled": details.get("enabled", [])}
        return ApplyResult(applied=applied, message=plan.description)

    def _remove_if_empty(self, directory: Path) -> tuple[bool, str]:
        """(whether our group is gone now, the note for the message): a group still holding a
        process stays, without a note; "+cpu" may only be taken back once it is gone."""
        try:
            if cgroup_pids(self.cgroupfs, directory):
                return False, ""
            self.cgroupfs.rmdir(directory)
            return True, f"; removed {directory}"
        except OSError as exc:
            return False, f"; could not remove {directory} ({exc.strerror})"

    # -- restore ------------------------------------------------------------------------------
    def restore(self, identity: ProcessIdentity, original: dict, applied: dict | None, planned: dict | None = None) -> RestoreResult:
        # planned (an intent whose outcome is unknown): its values are what apply would have left.
        applied = applied if applied is not None else planned
        if "unit" in original:
            return self._restore_unit_result(original, applied)
        if original.get("outside_units"):
            return self._restore_from_scope(identity, original, applied)
        return self._restore_group(identity, original, applied)

    def _restore_from_scope(self, identity: ProcessIdentity, original: dict, applied: dict | None) -> RestoreResult:
        if self.scopes is None:
            raise ChangeFailed(f"pid {identity.pid}: systemd is not reachable from here, so it stays in remediator's scope")
        now = process_cgroup_path(self._mount_of(original), self.procfs.cgroups(identity.pid))
        return self.scopes.restore(identity.pid, original["cgroup"], applied, now)

    def _restore_group(self, identity: ProcessIdentity, original: dict, applied: dict | None) -> RestoreResult:
        mount = self._mount_of(original)
        back = mount.fs_path(original["cgroup"])
        if back is None:
            raise ChangeFailed(f"the original cgroup {original['cgroup']} is outside {mount.mount_point}: {KEPT}")
        ours = (applied or {}).get("cgroup")
        now = process_cgroup_path(mount, self.procfs.cgroups(identity.pid))
        if now == original["cgroup"] and now != ours:
            # The move never happened (a crash between the intent and the move): nothing to put back.
            return RestoreResult(f"pid {identity.pid} is in its original cgroup {now}: nothing to restore" + self.cleanup(original, applied))
        if ours is not None and now != ours:
            text = f"pid {identity.pid} is in {now}, not in {ours} where remediator put it: {KEPT}" + self.cleanup(original, applied)
            return RestoreResult(text, restored=False, left={"cgroup": now, "set": ours})
        try:
            self.cgroupfs.write(back / "cgroup.procs", str(identity.pid))
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise ProcessGone(identity.pid) from None
            raise ChangeFailed(f"write {identity.pid} to {back / 'cgroup.procs'}: {exc.strerror}") from None
        return RestoreResult(f"write {identity.pid} to {back / 'cgroup.procs'} (was {ours})" + self.cleanup(original, applied))

    def _restore_unit_result(self, original: dict, applied: dict | None) -> RestoreResult:
        text, back, left = self._restore_unit_parts(original, applied)
        return RestoreResult(text, restored=bool(back) or not left, left=left or None)

    def _restore_unit_parts(self, original: dict, applied: dict | None) -> tuple[str, dict, dict]:
        """(what was done, the properties given back, what someone else changed since)."""
        unit = original["unit"]
        if self.systemd is None:
            raise ChangeFailed(f"{unit}: systemd is not reachable from here, so its CPU properties stay as remediator set them")
        ours = {name: int(value) for name, value in ((applied or {}).get("properties") or {}).items()}
        before = {name: int(value) for name, value in original["properties"].items()}
        now = systemd_call(lambda: self.systemd.get_unit_properties(unit, PROPERTIES), KEPT)
        # Only the properties still holding our value go back: an operator's change since stays.
        back = {name: before[name] for name in PROPERTIES if name in before and ours.get(name) != before[name] and now.get(name) == ours.get(name)}
        changed_by_others = [name for name in PROPERTIES if name in ours and ours[name] != before.get(name) and now.get(name) != ours[name]]
        text = ""
        if back:
            systemd_call(lambda: self.systemd.set_unit_properties(unit, back), KEPT)
            assignments = " ".join(property_text(name, value) for name, value in back.items())
            text = f"systemd SetUnitProperties {unit} --runtime {assignments} (was {' '.join(property_text(n, ours[n]) for n in back)})"
            # Drop-ins that were there before are an operator's: they now hold their value again.
            text += self.systemd.remove_runtime_dropins(unit, [n for n in back if n not in original.get("runtime_dropins", PROPERTIES)])
        if changed_by_others:
            note = ", ".join(property_text(name, now.get(name, UNSET)) for name in changed_by_others)
            text += ("; " if text else "") + f"{unit} has {note}, not what remediator set: {KEPT}"
        left = {"unit": unit, "now": {n: now.get(n, UNSET) for n in changed_by_others}, "set": {n: ours[n] for n in changed_by_others}} if changed_by_others else {}
        return text or f"{unit}: nothing of remediator's left to restore", back, left

    @staticmethod
    def _mount_of(original: dict) -> CgroupMount:
        return CgroupMount(int(original["version"]), Path(original["mount"]), original.get("root", "/"), frozenset({"cpu"}))

    def cleanup(self, original: dict, applied: dict | None) -> str:
        """After the process left: give the unit back its properties (the unit outlives the
        process: a compressor a shipper forked, a service restarted), remove our v1 group, or stop
        our scope, once no process is left in it. A unit systemd cannot be asked about now raises,
        so that the entry stays for another attempt."""
        ours = (applied or {}).get("cgroup")
        if original.get("outside_units"):
            scope = scope_of_applied(applied)
            return self.scopes.stop_if_empty(scope) if self.scopes is not None and scope else ""
        if "unit" in original:
            text, _back, _left = self._restore_unit_parts(original, applied)
            return text
        if not ours or not ours.lstrip("/").startswith(CGROUP_PREFIX):
            return ""
        directory = self._mount_of(original).fs_path(ours)
        enabled = list((applied or {}).get("enabled", ()))
        if directory is None:
            return ""
        if self.cgroupfs.exists(directory):
            gone, removed = self._remove_if_empty(directory)
            if not gone:
                return removed
        else:
            removed = ""
        return removed + (give_back_controller(self.cgroupfs, "cpu", enabled) if enabled else "")

    def maintain(
        self, identity: ProcessIdentity, original: dict, applied: dict, known_tids: set[int], noticed: set[int] | None = None,
        *, journalled: dict | None = None,
    ) -> None:
        return None  # a cgroup holds every thread, and threads born later, by itself


# -- the kind ------------------------------------------------------------------------------------

def cpu_steps_unavailable(mount: CgroupMount | None) -> str | None:
    """Why no cpu step (cpu_weight, cpu_idle, cpu_max) can work on a host with this cpu hierarchy, or None."""
    if mount is None:
        return ("not available on this host: no cgroup cpu controller is mounted (no v1 cpu hierarchy, "
                "and no v2 tree lists cpu in cgroup.controllers)")
    return None


def compile_cpu_max(text: str, key: tuple, at: Compiling) -> dict[str, int]:
    """"50%" -> 50 ms per 100 ms; "20ms/100ms" as written. The kernel takes periods of 1 ms to 1 s
    and quotas of at least 1 ms."""
    if text.endswith("%"):
        period_us = 100_000
        quota_us = round(float(text[:-1]) * period_us / 100)
    else:
        quota, period = text.split("/")
        quota_us, period_us = round(parse_duration(quota) * 1e6), round(parse_duration(period) * 1e6)
    if not 1_000 <= period_us <= 1_000_000:
        at.problem(key, f"{text}: the period must be from 1ms to 1s", "range")
    elif quota_us < 1_000:
        at.problem(key, f"{text}: the quota must be at least 1ms per period", "range")
    return {"quota_us": quota_us, "period_us": period_us}


class CpuKind:
    """cpu_weight, cpu_idle and cpu_max: one kind, its setting one of {"weight": N}, {"idle": 1},
    {"quota_us": Q, "period_us": P}."""

    name = "cpu"
    group_weighted = False
    keys = (
        Key("cpu_weight", "integer", "Lower the weight of the process's cgroup against its siblings (1..10000; the default "
            "is 100): the unit's CPUWeight through systemd, else cpu.weight (v2) or cpu.shares (v1) of a remediator-owned group.",
            minimum=1, maximum=10000),
        Key("cpu_idle", "boolean", "`true`: make the process's cgroup idle (cpu.idle: SCHED_IDLE for the whole group "
            "against its siblings): CPUWeight=idle through systemd, else cpu.idle of a remediator-owned group (v2, or v1 "
            "where the kernel has it).",),
        Key("cpu_max", "string", "Cap the process's cgroup: a share of one CPU (`\"50%\"`, `\"200%\"` is two CPUs) or "
            "quota/period (`\"20ms/100ms\"`): CPUQuota through systemd, else cpu.max (v2) or cpu.cfs_quota_us (v1) of a "
            "remediator-owned group.", pattern=r"^([0-9]+(\.[0-9]+)?%|[0-9]+(us|ms|s)/[0-9]+(us|ms|s))$",
            pattern_hint='a percentage ("50%") or quota/period ("20ms/100ms")'),
    )

    def compile(self, action: Mapping[str, Any], at: Compiling) -> dict[str, Any]:
        if "cpu_weight" in action:
            setting = {"weight": action["cpu_weight"]}
        elif "cpu_idle" in action:
            if action["cpu_idle"] is not True:
                at.problem(("cpu_idle",), "false changes nothing: give `cpu_idle = true` or remove the step", "range")
            setting = {"idle": 1}
        else:
            setting = compile_cpu_max(action["cpu_max"], ("cpu_max",), at)
        return {"cpu": MappingProxyType(setting)}  # frozen, as the step

    def describe(self, params: Mapping[str, Any]) -> str:
        return setting_text(params["cpu"])

    def target(self, params: Mapping[str, Any], policy: str, min_cpus: int, request_cpus: frozenset[int],
               online_cpus: frozenset[int]) -> tuple[dict | None, str]:
        # On cgroup v1 one user's offenders of one policy share the group remediator-POLICY (.uidN).
        return {"cpu": dict(params["cpu"]), "group": policy}, ""

    def unavailable(self) -> str | None:
        return cpu_steps_unavailable(discover_cpu_mount())

    def effect(self, params: Mapping[str, Any], policy: str, min_cpus: int, pid: int, host: Host, data: dict) -> str:
        """Which path the step takes on this host, and what it would write (read only)."""
        mount = discover_cpu_mount()
        membership = host.procfs.cgroups(pid)
        step = self.describe(params)
        unavailable = cpu_steps_unavailable(mount)
        if unavailable:
            return unavailable
        assert mount is not None
        if mount.version == 2 and host.systemd_host:
            unit, why = unit_for_cgroup(membership.v2_path or "/")
            setting = params["cpu"]
            if setting.get("idle"):
                change = "CPUWeight=idle"
            elif "weight" in setting:
                change = f"CPUWeight={setting['weight']}"
            else:
                change = f"CPUQuota={setting['quota_us'] * 100 / setting['period_us']:g}% CPUQuotaPeriodSec={setting['period_us']}us"
            if unit is None and outside_units(membership.v2_path or "/")[0]:
                scope = owned_cgroup_name(policy, host.procfs.uid(pid)) + ".scope"
                return f"{step} through systemd: {scope_text(scope, pid, membership.v2_path or '/')} {change}"
            if unit is None:
                return f"refused on this systemd host: {why}"
            return (f"{step} through systemd: SetUnitProperties {unit} --runtime {change} "
                    "(never raised; every process of the unit gets it)")
        return self._owned_group_effect(params, policy, pid, host, mount)

    def _owned_group_effect(self, params: Mapping[str, Any], policy: str, pid: int, host: Host, mount: CgroupMount) -> str:
        """The exact writes into remediator-POLICY (v1, or v2 without systemd): the actuator's own plan,
        the same words a dry run prints."""
        step = self.describe(params)
        where = "cgroup v1 cpu controller" if mount.version == 1 else "cgroup v2 without systemd: a group of remediator's own"
        actuator = CpuActuator(host.procfs, mount=mount, cgroupfs=CgroupFS(), systemd=None)
        try:
            identity = host.procfs.identity(pid)
            plan = actuator.plan(identity, {"cpu": dict(params["cpu"]), "group": policy}, actuator.read(pid))
        except ActuatorError as exc:
            return f"{step}: refused on this host ({where}): {exc.message}"
        if plan.unchanged:
            return f"{step}: no change: {plan.description} ({where})"
        return f"{step}: {plan.description} ({where})"


CPU = CpuKind()
