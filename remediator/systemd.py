"""The system manager, for changes it must make itself: a process in a systemd unit is the unit's.

On a cgroup v2 host run by systemd, moving a unit's process into a cgroup of our own takes it out
of its unit (its MemoryMax and TasksMax stop applying, `systemctl stop` no longer reaches it) and
systemd may move it back at the next daemon-reload. The change systemd offers instead is a runtime
unit property, what `systemctl set-property --runtime UNIT AllowedCPUs=...` does: here through
systemd's D-Bus API (org.freedesktop.systemd1.Manager.SetUnitProperties), with jeepney, a pure
Python D-Bus implementation packaged by Debian (python3-jeepney) and on PyPI: no C extension and
no GLib main loop in a daemon that only ever makes a few blocking calls.

Kept small so the actuator can be tested against a fake: `unit_for_cgroup` (pure), and
`SystemdManager.get_allowed_cpus` / `set_allowed_cpus`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cpulist import format_cpulist
from .errors import RemediatorError

BUS_NAME = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACES = {".service": "org.freedesktop.systemd1.Service", ".scope": "org.freedesktop.systemd1.Scope"}
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
# SetUnitProperties(runtime) writes each setting to CONTROL_DIR/UNIT.d/50-NAME.conf, NAME being the
# unit-file setting the D-Bus property stands for.
CONTROL_DIR = "/run/systemd/system.control"
DROPIN_SETTING = {
    "AllowedCPUs": "AllowedCPUs",
    "CPUWeight": "CPUWeight",
    "CPUQuotaPerSecUSec": "CPUQuota",
    "CPUQuotaPeriodUSec": "CPUQuotaPeriodSec",
}


class SystemdError(RemediatorError):
    """A D-Bus call that failed; `denied` when systemd refused it for lack of privilege."""

    def __init__(self, message: str, *, denied: bool = False):
        super().__init__(message)
        self.denied = denied


def systemd_is_init(run_root: str | Path = "/run") -> bool:
    """sd_booted(): systemd is the system manager when /run/systemd/system exists."""
    return Path(run_root, "systemd/system").is_dir()


def unit_for_cgroup(cgroup_path: str) -> tuple[str | None, str]:
    """The system unit a cgroup v2 path belongs to: (unit, why) or (None, why not).

    Units live in slices: the first component that is not a slice is the unit, and anything below
    it is the unit's own (delegated) subtree. A user manager's units (below user@UID.service) are
    not the system manager's to change.
    """
    parts = [part for part in cgroup_path.split("/") if part]
    for index, part in enumerate(parts):
        if part.endswith(".slice"):
            continue
        if part.startswith("user@") and part.endswith(".service") and index + 1 < len(parts):
            return None, f"{cgroup_path} is inside {part}, a user's own service manager, not the system's"
        if part.endswith((".service", ".scope")):
            return part, f"{cgroup_path} belongs to {part}"
        return None, f"{cgroup_path} is not inside a systemd unit"
    return None, f"{cgroup_path} is a slice or the root, not a unit"


def cpus_to_mask(cpus: frozenset[int]) -> bytes:
    """systemd's CPU set on D-Bus: a little-endian bitmask as a byte array (empty = no restriction)."""
    if not cpus:
        return b""
    mask = bytearray(max(cpus) // 8 + 1)
    for cpu in cpus:
        mask[cpu // 8] |= 1 << (cpu % 8)
    return bytes(mask)


def mask_to_cpus(mask: bytes) -> frozenset[int]:
    return frozenset(index * 8 + bit for index, byte in enumerate(mask) for bit in range(8) if byte & (1 << bit))


def describe_allowed(cpus: str) -> str:
    return f'AllowedCPUs="{cpus}"' + (" (no restriction)" if not cpus else "")


class SystemdManager:
    """Blocking calls to the system manager over the system bus (one connection, opened lazily)."""

    def __init__(self, socket_path: str = SYSTEM_BUS_SOCKET, control_dir: str | Path = CONTROL_DIR):
        self.socket_path = socket_path
        self.control_dir = Path(control_dir)
        self._connection = None

    def _connect(self):
        if self._connection is None:
            try:
                from jeepney.io.blocking import open_dbus_connection
            except ImportError:
                raise SystemdError("the jeepney D-Bus library is not importable (Debian: python3-jeepney; run ./bootstrap setup)") from None
            try:
                self._connection = open_dbus_connection(bus=f"unix:path={self.socket_path}")
            except (OSError, ValueError) as exc:
                raise SystemdError(f"cannot reach the system bus at {self.socket_path} ({exc})") from None
        return self._connection

    def _call(self, message, what: str):
        from jeepney import DBusErrorResponse

        try:
            reply = self._connect().send_and_get_reply(message, timeout=10)
        except (OSError, TimeoutError) as exc:
            self.close()
            raise SystemdError(f"{what}: the system bus did not answer ({exc})") from None
        try:
            from jeepney import MessageType

            if reply.header.message_type == MessageType.error:
                raise DBusErrorResponse(reply)
        except DBusErrorResponse as exc:
            denied = exc.name in ("org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired")
            detail = exc.data[0] if exc.data else exc.name
            raise SystemdError(f"{what}: {exc.name}: {detail}", denied=denied) from None
        return reply.body

    def _unit_path(self, unit: str) -> str:
        from jeepney import DBusAddress, new_method_call

        # LoadUnit, not GetUnit: a unit stopped since (the offender's service, after its process
        # is gone) is unloaded, yet its runtime property is still ours to give back.
        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        return self._call(new_method_call(manager, "LoadUnit", "s", (unit,)), f"LoadUnit({unit})")[0]

    def get_allowed_cpus(self, unit: str) -> str:
        """The unit's AllowedCPUs as a CPU list ('' when unrestricted)."""
        from jeepney import DBusAddress
        from jeepney.wrappers import Properties

        interface = UNIT_INTERFACES.get(os.path.splitext(unit)[1])
        if interface is None:
            raise SystemdError(f"{unit}: only services and scopes carry AllowedCPUs")
        address = DBusAddress(self._unit_path(unit), bus_name=BUS_NAME, interface=interface)
        signature, value = self._call(Properties(address).get("AllowedCPUs"), f"get {unit} AllowedCPUs")[0]
        return format_cpulist(mask_to_cpus(bytes(value)))

    def set_allowed_cpus(self, unit: str, cpus: frozenset[int]) -> None:
        """`systemctl set-property --runtime UNIT AllowedCPUs=...` (empty = no restriction)."""
        from jeepney import DBusAddress, new_method_call

        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        message = new_method_call(manager, "SetUnitProperties", "sba(sv)", (unit, True, [("AllowedCPUs", ("ay", cpus_to_mask(cpus)))]))
        self._call(message, f"SetUnitProperties({unit}, runtime, AllowedCPUs={format_cpulist(cpus)})")

    def get_unit_properties(self, unit: str, names) -> dict[str, int]:
        """Integer (D-Bus 't') properties of a service or scope, e.g. CPUWeight."""
        from jeepney import DBusAddress
        from jeepney.wrappers import Properties

        interface = UNIT_INTERFACES.get(os.path.splitext(unit)[1])
        if interface is None:
            raise SystemdError(f"{unit}: only services and scopes carry CPU properties")
        address = DBusAddress(self._unit_path(unit), bus_name=BUS_NAME, interface=interface)
        values: dict[str, int] = {}
        for name in names:
            signature, value = self._call(Properties(address).get(name), f"get {unit} {name}")[0]
            values[name] = int(value)
        return values

    def set_unit_properties(self, unit: str, values: dict[str, int]) -> None:
        """`systemctl set-property --runtime UNIT NAME=VALUE...` for integer (D-Bus 't') properties."""
        from jeepney import DBusAddress, new_method_call

        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        assignments = [(name, ("t", int(value))) for name, value in values.items()]
        text = " ".join(f"{name}={value}" for name, value in values.items())
        self._call(new_method_call(manager, "SetUnitProperties", "sba(sv)", (unit, True, assignments)), f"SetUnitProperties({unit}, runtime, {text})")

    # -- transient scopes (offenders in no unit) -------------------------------------------------
    def unit_state(self, unit: str) -> str:
        """ActiveState of a unit ('inactive' for one systemd does not know)."""
        from jeepney import DBusAddress, new_method_call
        from jeepney.wrappers import Properties

        # GetUnit, not LoadUnit: loading a scope that does not exist would leave a stub behind.
        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        try:
            path = self._call(new_method_call(manager, "GetUnit", "s", (unit,)), f"GetUnit({unit})")[0]
        except SystemdError as exc:
            if "NoSuchUnit" in str(exc):
                return "inactive"
            raise
        address = DBusAddress(path, bus_name=BUS_NAME, interface="org.freedesktop.systemd1.Unit")
        return str(self._call(Properties(address).get("ActiveState"), f"get {unit} ActiveState")[0][1])

    def start_transient_scope(self, unit: str, pids, values: dict[str, int], description: str,
                              allowed_cpus: frozenset[int] | None = None) -> None:
        """`systemd-run --scope`'s call: a scope holding `pids`, with integer properties set from the start.
        CollectMode inactive-or-failed: the scope is forgotten as soon as its last process leaves."""
        from jeepney import DBusAddress, new_method_call

        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        properties = [
            ("Description", ("s", description)),
            ("Slice", ("s", "system.slice")),
            ("PIDs", ("au", [int(pid) for pid in pids])),
            ("CollectMode", ("s", "inactive-or-failed")),
        ] + [(name, ("t", int(value))) for name, value in values.items()]
        if allowed_cpus is not None:
            properties.append(("AllowedCPUs", ("ay", cpus_to_mask(allowed_cpus))))
        self._call(new_method_call(manager, "StartTransientUnit", "ssa(sv)a(sa(sv))", (unit, "fail", properties, [])),
                   f"StartTransientUnit({unit}, PIDs={list(pids)})")

    def attach_processes(self, unit: str, pids) -> None:
        """Move processes into a running unit (AttachProcessesToUnit, systemd 238+)."""
        from jeepney import DBusAddress, new_method_call

        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        self._call(new_method_call(manager, "AttachProcessesToUnit", "ssau", (unit, "", [int(pid) for pid in pids])),
                   f"AttachProcessesToUnit({unit}, {list(pids)})")

    def stop_unit(self, unit: str) -> None:
        from jeepney import DBusAddress, new_method_call

        manager = DBusAddress(MANAGER_PATH, bus_name=BUS_NAME, interface=MANAGER_INTERFACE)
        self._call(new_method_call(manager, "StopUnit", "ss", (unit, "fail")), f"StopUnit({unit})")

    # -- runtime drop-ins ----------------------------------------------------------------------
    def _dropin(self, unit: str, prop: str) -> Path:
        return self.control_dir / f"{unit}.d" / f"50-{DROPIN_SETTING.get(prop, prop)}.conf"

    def runtime_dropins(self, unit: str, properties) -> list[str]:
        """The properties that already have a runtime drop-in (an operator's set-property --runtime)."""
        return [prop for prop in properties if self._dropin(unit, prop).exists()]

    def remove_runtime_dropins(self, unit: str, properties) -> str:
        """Remove the drop-ins our runtime changes left once their value is the original again:
        left in place, `CPUWeight=` would override the unit file's value at the next daemon-reload.
        No reload is needed: systemd already holds the original. '' or what could not be removed."""
        problems = []
        for prop in properties:
            path = self._dropin(unit, prop)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(f"{path} ({exc.strerror})")
        try:
            (self.control_dir / f"{unit}.d").rmdir()  # only when empty
        except OSError:
            pass
        return f"; could not remove the runtime drop-in {', '.join(problems)}" if problems else ""

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except OSError:
                pass
            self._connection = None
