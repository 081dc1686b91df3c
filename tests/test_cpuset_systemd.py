"""The cpuset step on a systemd + cgroup v2 host: the unit's runtime AllowedCPUs, through systemd.

Against a fake cgroup v2 tree and a fake system manager (the real D-Bus path runs in the guest
VMs: tests/guest/test_service.py). What is proven here: the unit is found from the cgroup path,
the original property is journaled and given back only while it still holds our value (also
after the process is gone), a unit that also holds a protected process is refused, a process of
a user's own manager is refused rather than moved out of it (one in no unit at all moves into
remediator's own scope: tests/guest/test_scope.py), and nothing is ever written to cgroupfs.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from remediator.actuators import CpuActuator, CpusetActuator
from remediator.executor import Executor
from remediator.journal import Journal
from remediator.model import ActionRequest
from remediator.procfs import ProcessIdentity
from remediator.systemd import SystemdError, SystemdManager, cpus_to_mask, mask_to_cpus, unit_for_cgroup
from test_cpuset_v2 import PID, SERVICE, START, V2Host

OTHER = 5_000_010  # a second process of the same unit


class FakeSystemd:
    """The system manager: a property per unit, realized into the unit's cgroup as systemd does
    (unless `realizes` is False: a manager that answers but never writes the cgroup)."""

    def __init__(self, allowed: dict[str, str] | None = None, *, denied: bool = False, realizes: bool = True):
        self.allowed = dict(allowed or {})
        self.calls: list[tuple] = []
        self.denied = denied
        self.realizes = realizes
        self.cgroup_root = None
        self.control_dir = None  # set by SystemdHost: where runtime drop-ins are written, as systemd does
        self.properties: dict[str, dict[str, int]] = {}  # CPUWeight, CPUQuota... per unit (unset: 2**64 - 1)
        self.unreachable = False  # the bus does not answer

    # The drop-in bookkeeping is the real manager's: it only touches files.
    _dropin = SystemdManager._dropin
    runtime_dropins = SystemdManager.runtime_dropins
    remove_runtime_dropins = SystemdManager.remove_runtime_dropins

    def get_unit_properties(self, unit: str, names) -> dict[str, int]:
        self.calls.append(("get-properties", unit))
        if self.unreachable:
            raise SystemdError(f"get {unit}: the system bus did not answer (timed out)")
        return {name: self.properties.get(unit, {}).get(name, 2**64 - 1) for name in names}

    def set_unit_properties(self, unit: str, values: dict[str, int]) -> None:
        self.calls.append(("set-properties", unit, dict(values)))
        if self.unreachable:
            raise SystemdError(f"SetUnitProperties({unit}): the system bus did not answer (timed out)")
        self.properties.setdefault(unit, {}).update(values)

    def get_allowed_cpus(self, unit: str) -> str:
        self.calls.append(("get", unit))
        if unit not in self.allowed:
            raise SystemdError(f"GetUnit({unit}): org.freedesktop.systemd1.NoSuchUnit: Unit {unit} not loaded.")
        return self.allowed[unit]

    def set_allowed_cpus(self, unit: str, cpus: frozenset[int]) -> None:
        self.calls.append(("set", unit, sorted(cpus)))
        if self.denied:
            raise SystemdError("SetUnitProperties: org.freedesktop.DBus.Error.AccessDenied: Access denied", denied=True)
        from remediator.cpulist import format_cpulist

        self.allowed[unit] = format_cpulist(cpus)
        if self.control_dir is not None:
            dropin = self._dropin(unit, "AllowedCPUs")
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(f"# This is a drop-in unit file extension, created via \"systemctl set-property\"\n[Service]\nAllowedCPUs={format_cpulist(cpus)}\n")
        if self.realizes and self.cgroup_root is not None:
            (self.cgroup_root / "system.slice" / unit / "cpuset.cpus").write_text(format_cpulist(cpus) + "\n")


class SystemdHost(V2Host):
    def __init__(self, tmp_path, systemd: FakeSystemd):
        super().__init__(tmp_path)
        self.systemd = systemd
        systemd.cgroup_root = self.root
        systemd.control_dir = tmp_path / "run-systemd-system.control"

    def executor(self, *, dry_run: bool = False) -> Executor:
        actuator = CpusetActuator(
            self.procfs, mount=self.cgroupfs.mount, cgroupfs=self.cgroupfs, syscalls=self.threads, systemd=self.systemd,
            sysfs_root=self._sysfs(),
        )
        journal = None if dry_run else Journal(self.journal_path)
        if journal:
            self.journals.append(journal)
        return Executor(journal, self.procfs, dry_run=dry_run, actuators={"cpuset": actuator}, self_pid=0)

    def _sysfs(self):
        root = self.cgroupfs.root.parent / "sys"
        (root / "devices/system/cpu").mkdir(parents=True, exist_ok=True)
        (root / "devices/system/cpu/online").write_text("0-3\n")
        return root


@pytest.fixture
def systemd_host(tmp_path):
    made = []

    def build(allowed=None, **options) -> SystemdHost:
        made.append(SystemdHost(tmp_path, FakeSystemd({"fluent-bit.service": ""} if allowed is None else allowed, **options)))
        return made[-1]

    yield build
    for host in made:
        host.close()


def cgroup_tree(host) -> list[str]:
    return sorted(str(path.relative_to(host.root)) for path in host.root.rglob("*") if path.is_dir())


@pytest.mark.parametrize(
    "path, unit",
    [
        ("/system.slice/fluent-bit.service", "fluent-bit.service"),
        ("/system.slice/fluent-bit.service/worker", "fluent-bit.service"),  # a delegated subtree is the unit's
        ("/system.slice/app.slice/api.service", "api.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/system.slice/docker-4f2a.scope", "docker-4f2a.scope"),
        ("/user.slice/user-1000.slice/user@1000.service/app.slice/fluent-bit.service", None),  # the user's manager
        ("/system.slice", None),
        ("/", None),
        ("/remediator-log-shippers", None),
    ],
)
def test_the_unit_of_a_cgroup(path, unit):
    assert unit_for_cgroup(path)[0] == unit


def test_cpu_masks_round_trip():
    assert cpus_to_mask(frozenset({0, 9})) == bytes([0b1, 0b10])
    assert mask_to_cpus(bytes([0b1, 0b10])) == {0, 9}
    assert cpus_to_mask(frozenset()) == b""


def test_sets_the_units_allowed_cpus_and_gives_the_original_back(systemd_host):
    host = systemd_host()
    before = cgroup_tree(host)
    executor = host.executor()
    outcome = executor.apply(host.request(cpus={2, 3}), ())
    assert outcome.status == "applied", outcome.message
    assert "SetUnitProperties fluent-bit.service --runtime AllowedCPUs=2-3" in outcome.message
    assert 'was AllowedCPUs="" (no restriction)' in outcome.message
    assert host.systemd.allowed["fluent-bit.service"] == "2-3"
    assert cgroup_tree(host) == before, "the process stays in its unit: no cgroup of our own"
    assert host.procfs.cgroups(PID)  # still readable
    entry = executor.journal.active()[0]
    assert entry.original["unit"] == "fluent-bit.service" and entry.original["allowed_cpus"] == ""

    [restored] = executor.restore()
    assert restored.status == "restored", restored.message
    assert host.systemd.allowed["fluent-bit.service"] == ""
    assert host.systemd.calls[-1] == ("set", "fluent-bit.service", [])


def test_an_operators_later_change_is_left_alone(systemd_host):
    host = systemd_host()
    executor = host.executor()
    assert executor.apply(host.request(cpus={2, 3}), ()).status == "applied"
    host.systemd.allowed["fluent-bit.service"] = "3"  # systemctl set-property by hand since
    [restored] = executor.restore()
    assert "left as it is" in restored.message
    assert restored.status == "left-changed-by-other" and not restored.is_error
    assert restored.left == {"unit": "fluent-bit.service", "now": "3", "set": "2-3"}
    assert host.systemd.allowed["fluent-bit.service"] == "3"
    assert executor.active() == []


def test_a_unit_already_within_the_step_is_left_and_one_that_overlaps_gets_the_overlap(systemd_host):
    host = systemd_host({"fluent-bit.service": "3"})
    executor = host.executor()
    unchanged = executor.apply(host.request(cpus={2, 3}), ())
    assert unchanged.status == "unchanged", unchanged
    assert unchanged.message == 'fluent-bit.service already has AllowedCPUs="3", within 2-3: left as it is'
    assert [call for call in host.systemd.calls if call[0] == "set"] == []

    host.systemd.allowed["fluent-bit.service"] = "0,3"
    narrowed = executor.apply(host.request(cpus={2, 3}), ())
    assert narrowed.status == "applied", narrowed
    assert "AllowedCPUs=3 " in narrowed.message and "the overlap with the unit's AllowedCPUs" in narrowed.message
    assert host.systemd.allowed["fluent-bit.service"] == "3"  # never 2, which it did not have
    [restored] = executor.restore()
    assert restored.status == "restored" and host.systemd.allowed["fluent-bit.service"] == "0,3"


def test_the_unit_gets_its_property_back_after_the_process_is_gone(systemd_host):
    host = systemd_host({"fluent-bit.service": "0-3"})
    executor = host.executor()
    assert executor.apply(host.request(cpus={1}), ()).status == "applied"
    shutil.rmtree(host.procs.root / str(PID))
    outcomes = executor.restore()
    assert host.systemd.allowed["fluent-bit.service"] == "0-3", [str(o) for o in outcomes]


def test_a_unit_that_also_holds_a_protected_process_is_refused(systemd_host):
    host = systemd_host()
    host.procs.add_process(OTHER, START, comm="api", cgroup=SERVICE)
    host.cgroupfs.place(SERVICE, OTHER)
    outcome = host.executor().apply(host.request(), protected_pids={OTHER})
    assert outcome.status == "refused"
    assert f"reaches pid {OTHER} (api) too" in outcome.message and "protected service" in outcome.message
    assert not [call for call in host.systemd.calls if call[0] == "set"]


def test_a_unit_that_also_holds_another_users_process_is_refused(systemd_host):
    """cron's unit holds every user's jobs when PAM opens no session for them: a job of uid 1000
    calling itself fluent-bit must not get root's cron daemon confined with it."""
    host = systemd_host()
    host.procs.add_process(OTHER, START, comm="cron", cgroup=SERVICE, uid=0)
    host.cgroupfs.place(SERVICE, OTHER)
    (host.procs.root / str(PID) / "status").write_text(f"Name:\tfluent-bit\nTgid:\t{PID}\nUid:\t1000\t1000\t1000\t1000\n")
    outcome = host.executor().apply(host.request(), protected_pids=())
    assert outcome.status == "refused", outcome
    assert f"reaches pid {OTHER} (cron) too, which runs as uid 0, not as the offender's uid 1000" in outcome.message
    assert not [call for call in host.systemd.calls if call[0] == "set"]


def test_a_process_under_a_users_manager_is_refused_not_moved(systemd_host, tmp_path):
    host = systemd_host()
    user_unit = "/user.slice/user-1000.slice/user@1000.service/app.slice/fluent-bit.service"
    for cgroup in ("/user.slice", "/user.slice/user-1000.slice", "/user.slice/user-1000.slice/user@1000.service",
                   "/user.slice/user-1000.slice/user@1000.service/app.slice"):
        host.cgroupfs.make_cgroup(cgroup)
    host.cgroupfs.make_cgroup(user_unit)
    host.cgroupfs.place(user_unit, PID)
    before = cgroup_tree(host)
    outcome = host.executor().apply(host.request(), ())
    assert outcome.status == "invalid", outcome.message
    assert "user's own service manager" in outcome.message and "nothing changed" in outcome.message
    assert cgroup_tree(host) == before


def test_denied_by_systemd_is_a_denied_outcome(systemd_host):
    host = systemd_host(denied=True)
    outcome = host.executor().apply(host.request(), ())
    assert outcome.status == "denied"
    assert "AccessDenied" in outcome.message


def test_dry_run_names_the_property_and_changes_nothing(systemd_host):
    host = systemd_host()
    outcome = host.executor(dry_run=True).apply(host.request(cpus={2}), ())
    assert outcome.status == "would-apply"
    assert "AllowedCPUs=2" in outcome.message
    assert not [call for call in host.systemd.calls if call[0] == "set"]


def test_a_manager_that_never_writes_the_cgroup_is_reported(systemd_host, monkeypatch):
    import remediator.actuators.cpuset as cpuset

    monkeypatch.setattr(cpuset, "UNIT_REALIZE_TIMEOUT_S", 0.05)
    host = systemd_host(realizes=False)
    outcome = host.executor().apply(host.request(cpus={2}), ())
    assert outcome.status == "applied"
    assert "cpuset.cpus still reads" in outcome.message


def test_the_change_waits_for_systemd_to_write_the_cgroup(systemd_host):
    host = systemd_host()
    executor = host.executor()
    assert executor.apply(host.request(cpus={2, 3}), ()).status == "applied"
    assert (host.root / "system.slice/fluent-bit.service/cpuset.cpus").read_text().strip() == "2-3"
    [restored] = executor.restore()
    assert "still reads" not in restored.message
    assert (host.root / "system.slice/fluent-bit.service/cpuset.cpus").read_text().strip() == ""


def test_policy_explain_says_a_cpuset_step_goes_through_systemd(tmp_path, monkeypatch):
    """On a systemd host `policy explain` names the unit property, not a cgroup of our own."""
    from helpers.fake_cgroupfs import FakeProcTree
    from remediator.actuators import Host, cpuset as cpuset_module
    from remediator.cgroupfs import CgroupMount
    from remediator.explain import first_step_effect
    from remediator.procfs import ProcFS
    from test_policy_model import FULL, compile_text

    [policy], _ = compile_text(FULL)
    cpuset_step = policy.steps[2]
    # A v2 tree offering cpuset, whatever the test machine has (without one the step is not available).
    monkeypatch.setattr(cpuset_module, "discover_mounts",
                        lambda: [CgroupMount(2, tmp_path / "cgroup", "/", frozenset({"cpuset", "cpu"}))])
    procs = FakeProcTree(tmp_path / "proc")
    procs.add_process(PID, START, cgroup=SERVICE, tids=())
    procs.add_process(OTHER, START, cgroup="/user.slice/user-1000.slice/user@1000.service/app.slice/x.service", tids=())
    online = frozenset(range(4))
    host = Host(ProcFS(tmp_path / "proc"), systemd_host=True, request_cpus=frozenset({0, 1}), online_cpus=online)
    text, data = first_step_effect(cpuset_step, policy, PID, host)
    assert text.startswith("cpuset through systemd: SetUnitProperties fluent-bit.service --runtime AllowedCPUs=2-3"), text
    assert data["unit"] == "fluent-bit.service"
    text, _ = first_step_effect(cpuset_step, policy, OTHER, host)
    assert text.startswith("refused on this systemd host") and "user's own service manager" in text
    text, _ = first_step_effect(cpuset_step, policy, PID, dataclasses.replace(host, systemd_host=False))
    assert text.startswith("cpuset: move from")


def test_revert_leaves_no_runtime_drop_in_of_ours_and_keeps_an_operators(tmp_path, systemd_host):
    """A restore through SetUnitProperties rewrites 50-AllowedCPUs.conf with the original value; left
    there, it would override the unit file's AllowedCPUs at the next daemon-reload."""
    host = systemd_host()
    executor = host.executor()
    assert executor.apply(host.request(cpus={2, 3}), ()).status == "applied"
    dropin = host.systemd._dropin("fluent-bit.service", "AllowedCPUs")
    assert dropin.read_text().endswith("AllowedCPUs=2-3\n")
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert not dropin.exists() and not dropin.parent.exists()

    # An operator's own runtime setting was there first: it is theirs, and it stays (with their value).
    host.systemd.set_allowed_cpus("fluent-bit.service", frozenset({0, 1, 2, 3}))
    assert executor.apply(host.request(cpus={2, 3}), ()).status == "applied"
    executor.restore()
    assert dropin.exists() and dropin.read_text().endswith("AllowedCPUs=0-3\n")


def cpu_executor(host) -> Executor:
    cpu = CpuActuator(host.procfs, mount=host.cgroupfs.mount, cgroupfs=host.cgroupfs, systemd=host.systemd)
    journal = Journal(host.journal_path)
    host.journals.append(journal)
    return Executor(journal, host.procfs, dry_run=False, actuators={"cpu": cpu}, self_pid=0)


def cpu_idle_request() -> ActionRequest:
    return ActionRequest(ProcessIdentity(PID, START), "cpu", "log-shippers", 0, {"cpu": {"idle": 1}, "group": "log-shippers"})


def test_a_units_cpu_weight_is_given_back_when_the_process_it_was_set_for_exits(systemd_host):
    """A compressor a shipper forked is stepped: CPUWeight=idle on the shipper's unit, journaled
    under the compressor. The unit outlives it: when it exits, the unit gets its weight back
    (it stayed idle until reboot before, out of reach of any revert)."""
    host = systemd_host()
    executor = cpu_executor(host)
    assert executor.apply(cpu_idle_request(), ()).status == "applied"
    assert host.systemd.properties["fluent-bit.service"]["CPUWeight"] == 0

    shutil.rmtree(host.procs.root / str(PID))
    [outcome] = executor.maintain()

    assert outcome.status == "dropped", outcome
    assert "SetUnitProperties fluent-bit.service --runtime CPUWeight=[not set]" in outcome.message
    assert host.systemd.properties["fluent-bit.service"]["CPUWeight"] == 2**64 - 1
    assert executor.active() == []


def test_with_systemd_unreachable_the_entry_stays_until_the_unit_can_be_given_back(systemd_host):
    host = systemd_host()
    executor = cpu_executor(host)
    assert executor.apply(cpu_idle_request(), ()).status == "applied"
    shutil.rmtree(host.procs.root / str(PID))
    host.systemd.unreachable = True

    [outcome] = executor.maintain()

    assert outcome.status == "failed" and "stays in the journal" in outcome.message, outcome
    assert len(executor.active()) == 1
    host.systemd.unreachable = False
    [outcome] = executor.maintain()
    assert outcome.status == "dropped", outcome
    assert host.systemd.properties["fluent-bit.service"]["CPUWeight"] == 2**64 - 1
    assert executor.active() == []


def test_a_unit_of_more_processes_than_are_checked_is_refused(systemd_host, monkeypatch):
    """Each process a unit-wide change reaches is read in full first: a user's session scope of
    thousands would stall the tick at every attempt, so past the bound the change is refused."""
    import remediator.executor

    monkeypatch.setattr(remediator.executor, "AFFECTED_CHECK_MAX", 2)
    host = systemd_host()
    for pid in (OTHER, OTHER + 1):
        host.procs.add_process(pid, START, comm="worker", cgroup=SERVICE)
        host.cgroupfs.place(SERVICE, pid)
    outcome = host.executor().apply(host.request(), protected_pids=())
    assert outcome.status == "refused", outcome
    assert "reaches 3 processes, more than the 2 remediator checks" in outcome.message
    assert not [call for call in host.systemd.calls if call[0] == "set"]


def test_two_offenders_of_one_unit_give_its_original_back_whichever_exits_first(systemd_host):
    """A (cpu_weight 10, the unit was at its default) then B (cpu_idle) in one unit: each step is
    an entry. A exits first while B's idle holds: A waits, B gives back A's weight when it exits,
    then A the unit's original. Before, A closed as "changed by someone else" and the unit was
    left at A's weight for good."""
    host = systemd_host()
    host.procs.add_process(OTHER, START, comm="fluent-bit", cgroup=SERVICE)
    host.cgroupfs.place(SERVICE, OTHER)
    executor = cpu_executor(host)
    weight = ActionRequest(ProcessIdentity(PID, START), "cpu", "log-shippers", 0, {"cpu": {"weight": 10}, "group": "log-shippers"})
    idle = ActionRequest(ProcessIdentity(OTHER, START), "cpu", "log-shippers", 1, {"cpu": {"idle": 1}, "group": "log-shippers"})
    assert executor.apply(weight, ()).status == "applied"
    assert executor.apply(idle, ()).status == "applied"
    properties = host.systemd.properties["fluent-bit.service"]
    assert properties["CPUWeight"] == 0

    shutil.rmtree(host.procs.root / str(PID))
    [waiting] = executor.maintain()
    assert waiting.status == "unchanged" and "given back after the newer change" in waiting.message, waiting
    assert properties["CPUWeight"] == 0 and len(executor.active()) == 2

    shutil.rmtree(host.procs.root / str(OTHER))
    outcomes = executor.maintain()  # the older first, still waiting; then the newer gives back 10
    assert properties["CPUWeight"] == 10, [str(o) for o in outcomes]
    outcomes = executor.maintain()
    assert [o.status for o in outcomes] == ["dropped"], [str(o) for o in outcomes]
    assert properties["CPUWeight"] == 2**64 - 1
    assert executor.active() == []
