"""Protection spoofing (issue 11): a local user's process must not make itself protected.

Units are anchored to the system manager's units, `[protect] users` refuses processes of other
users, `request_cpus = "auto"` comes from the protected processes' cgroups, and comm selectors that
match several users are reported. Fake /proc trees for the logic; real processes and a real cpuset
cgroup (as root) for the kernel path.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from helpers.cgroups import move_to, scratch_cpuset  # noqa: F401  (fixture)
from helpers.fakeproc import FakeProc, FakeProcess, FakeThread
from helpers.workloads import victim_argv
from remediator.cgroupfs import CgroupFS, CgroupMount, discover_cpuset_mount, process_cpuset_cpus
from remediator.collector import Collector
from remediator.config import compile_config, parse_source
from remediator.cpulist import online_cpus
from remediator.daemon import shared_comm_warnings
from remediator.explain import explain
from remediator.matching import Match
from remediator.placement import auto_request_cpus
from remediator.model import PolicySet
from remediator.policy import check_sources, load_policies
from remediator.procfs import ProcFS, system_units, unit_from_cgroup_path
from remediator.selectors import ProtectSelectors

from helpers.sources import Clock, RecordingSource

USER_NGINX = "/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service"
NESTED_NGINX = "/system.slice/a.service/x/nginx.service"


# -- unit anchoring -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "path, units",
    [
        ("/system.slice/nginx.service", ("system.slice", "nginx.service")),
        ("/system.slice/nginx.service/worker", ("system.slice", "nginx.service")),
        ("/foo.slice/bar.slice/nginx.service", ("foo.slice", "bar.slice", "nginx.service")),
        ("/user.slice/user-1000.slice/session-3.scope", ("user.slice", "user-1000.slice", "session-3.scope")),
        # A user's manager and a unit's delegated subtree name cgroups as they like: not system units.
        (USER_NGINX, ("user.slice", "user-1000.slice", "user@1000.service")),
        (NESTED_NGINX, ("system.slice", "a.service")),
        ("/docker/abc/nginx.service", ()),
        ("/", ()),
    ],
)
def test_system_units_are_anchored_at_the_first_unit_below_the_slices(path, units):
    assert system_units(path) == units


def test_the_unit_of_a_process_is_its_system_unit():
    assert unit_from_cgroup_path("/system.slice/nginx.service") == "nginx.service"
    assert unit_from_cgroup_path(USER_NGINX) == "user@1000.service"
    assert unit_from_cgroup_path(NESTED_NGINX) == "a.service"
    assert unit_from_cgroup_path("/system.slice") == ""


def anchoring_tree(tmp_path) -> ProcFS:
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(10, "nginx", cgroup_v2="/system.slice/nginx.service"))
    proc.add(FakeProcess(11, "nginx", cgroup_v2="/foo.slice/bar.slice/nginx.service"))
    proc.add(FakeProcess(20, "nginx", uid=1000, cgroup_v2=USER_NGINX))
    proc.add(FakeProcess(30, "nginx", cgroup_v2=NESTED_NGINX))
    # cgroup v1: the name=systemd hierarchy carries systemd's layout, anchored the same way.
    proc.add(FakeProcess(40, "nginx", cgroup_v2="/", cgroup_v1={"name=systemd": "/system.slice/nginx.service", "cpuset": "/"}))
    proc.add(FakeProcess(41, "nginx", uid=1000, cgroup_v2="/", cgroup_v1={"name=systemd": USER_NGINX, "cpu,cpuacct": USER_NGINX}))
    return ProcFS(proc.write())


def test_a_protect_unit_matches_only_the_system_managers_unit(tmp_path):
    procfs = anchoring_tree(tmp_path)
    assert set(ProtectSelectors.build(units=["nginx"]).resolve(procfs)) == {10, 11, 40}
    # The user's manager itself is a system unit; what runs below it is that unit's.
    assert set(ProtectSelectors.build(units=["user@1000.service"]).resolve(procfs)) == {20, 41}
    assert set(ProtectSelectors.build(units=["a.service"]).resolve(procfs)) == {30}


def test_a_policy_unit_glob_matches_only_system_units(tmp_path):
    procfs = anchoring_tree(tmp_path)
    match = Match.build(unit=("nginx.service",))
    assert {pid for pid in (10, 11, 20, 30) if match.matches(procfs.process_info(pid))} == {10, 11}
    assert Match.build(unit=("app.slice",)).matches(procfs.process_info(20)) is None  # a slice of the user's manager
    assert Match.build(unit=("user-1000.slice",)).matches(procfs.process_info(20)) is not None  # one of the system's


# -- [protect] users ------------------------------------------------------------------------------

def users_tree(tmp_path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(10, "nginx", uid=0, threads=[FakeThread(10), FakeThread(11)]))
    proc.add(FakeProcess(12, "nginx", uid=33, ppid=10))
    proc.add(FakeProcess(20, "nginx", uid=1000))  # a user's process calling itself nginx
    proc.add(FakeProcess(21, "nginx\n<0>forged", uid=1000))
    proc.add(FakeProcess(30, "nginx", uid=1000, euid=0))  # a setuid-root program run by a user
    proc.write()
    return proc


def test_users_refuse_processes_of_other_users_and_say_why(tmp_path):
    procfs = ProcFS(users_tree(tmp_path).root)
    selectors = ProtectSelectors.build(comms=["nginx*"], users=[0, 33])
    refused: dict = {}
    assert set(selectors.resolve(procfs, refused)) == {10, 12}
    assert set(refused) == {20, 21, 30}
    assert refused[20][1] == "matches comm nginx* but runs as uid 1000, not as a protect user (0, 33)"
    assert refused[30][1] == "matches comm nginx* but runs as uid 1000 (effective 0), not as a protect user (0, 33)"
    assert selectors.match_reason(procfs.process_info(20)) is None
    assert selectors.describe() == "comm nginx* as uids 0, 33"
    # Without users, any of them is protected (as before).
    assert set(ProtectSelectors.build(comms=["nginx*"]).resolve(procfs)) == {10, 12, 20, 21, 30}


def test_the_collector_warns_once_per_refused_process_with_its_comm_escaped(tmp_path, caplog):
    proc = users_tree(tmp_path)
    source, clock = RecordingSource(), Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["nginx*"], users=[0, 33]), ProcFS(proc.root),
                          rescan_s=5.0, mono_clock=clock)
    with caplog.at_level(logging.WARNING, logger="remediator.collector"):
        collector.start()
        clock.now += 6
        collector.sample()  # a second rescan: no second warning
    assert set(collector.protected) == {10, 12} and source.kernel_tids == {10, 11, 12}
    warnings = [r.getMessage() for r in caplog.records]
    assert sorted(w.split(":")[0] for w in warnings) == ["not protecting pid 20 (nginx)", "not protecting pid 21 (nginx\\n<0>forged)",
                                                        "not protecting pid 30 (nginx)"]
    assert all("\n" not in w for w in warnings)


def test_a_child_protected_on_fork_is_dropped_once_it_runs_as_another_user(tmp_path, caplog):
    proc = users_tree(tmp_path)
    source, clock = RecordingSource(), Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["nginx"], users=[0, 33]), ProcFS(proc.root),
                          rescan_s=5.0, mono_clock=clock)
    collector.start()
    # sshd-like: the protected process forks (the kernel protects the child), the child becomes a user.
    proc.add(FakeProcess(50, "sh", uid=1000, ppid=10))
    proc.add(FakeProcess(51, "worker", uid=33, ppid=10))
    proc.write()
    source.kernel_tids |= {50, 51}
    clock.now += 6
    with caplog.at_level(logging.WARNING, logger="remediator.collector"):
        collector.sample()
    assert 50 not in collector.protected and 50 not in source.kernel_tids
    assert collector.protected_reason[51] == "child of a protected process"
    assert any("not protecting pid 50 (sh): child of a protected process, but it runs as uid 1000" in r.getMessage()
               for r in caplog.records)
    # A known child that changes user later is dropped at the next rescan too.
    proc.processes[51].uid = 1000
    proc.write()
    clock.now += 6
    collector.sample()
    assert 51 not in collector.protected and 51 not in source.kernel_tids


# -- the config ---------------------------------------------------------------------------------

def compile_text(text: str, tmp_path):
    (tmp_path / "policies").mkdir(exist_ok=True)
    document, diagnostics = parse_source(text, str(tmp_path / "remediator.toml"))
    assert document is not None, diagnostics
    return compile_config(document)


def test_users_resolve_names_and_take_uids(tmp_path):
    config, diagnostics = compile_text('[protect]\ncomm = ["nginx"]\nusers = ["www-data", 0, "nobody"]\n', tmp_path)
    assert config is not None and config.protect.users == (33, 0, 65534)
    assert [d for d in diagnostics if d.severity != "warning"] == [] and config.warnings == ()


@pytest.mark.parametrize(
    "value, message",
    [
        ('["www-data", "no-such-user-x"]', "3:22: error: protect.users[1]: user 'no-such-user-x' does not exist on this host"),
        ('["33"]', "3:10: error: protect.users[0]: user '33' does not exist on this host (a uid is written without quotes: 33)"),
        ("[true]", "3:10: error: protect.users[0]: expected a user name (string) or a uid (integer), got a boolean (true)"),
        ("[-1]", "3:10: error: protect.users[0]: uid -1 is out of range"),
    ],
)
def test_a_bad_user_is_a_located_error(value, message, tmp_path):
    config, diagnostics = compile_text(f'[protect]\ncomm = ["nginx"]\nusers = {value}\n', tmp_path)
    assert config is None
    assert any(str(d).startswith(f"{tmp_path / 'remediator.toml'}:{message}") for d in diagnostics), [str(d) for d in diagnostics]


def test_protecting_by_comm_without_users_is_a_warning_that_policy_check_shows(tmp_path):
    config, diagnostics = compile_text('[protect]\ncomm = ["nginx"]\nunit = ["api"]\n', tmp_path)
    assert config is not None
    [warning] = config.warnings
    assert str(warning).startswith(f"{tmp_path / 'remediator.toml'}:2:8: warning: protect.comm: any process can set its own comm")
    assert warning.code == "comm-without-users"
    shown = check_sources([(str(tmp_path / "remediator.toml"), '[protect]\ncomm = ["nginx"]\n')], frozenset({0, 1}))
    assert [d.code for d in shown] == ["comm-without-users"]
    config, _ = compile_text('[protect]\nunit = ["api"]\n', tmp_path)
    assert config.warnings == ()  # units are the system manager's: no warning


# -- comm selectors that match several users ---------------------------------------------------------

def test_comm_globs_matching_several_users_are_reported(tmp_path):
    procfs = ProcFS(users_tree(tmp_path).root)
    infos = list(procfs.iter_processes())
    policy_dir = tmp_path / "p"
    policy_dir.mkdir()
    (policy_dir / "p.toml").write_text(
        '[[policy]]\nname = "web"\ndescription = "d"\nmatch = { comm = ["nginx"] }\ntrigger = { always = true }\n'
        'actions = [{ nice = 5 }]\n'
        '[[policy]]\nname = "web-www"\ndescription = "d"\nmatch = { comm = ["nginx"], user = ["www-data"] }\n'
        'trigger = { always = true }\nactions = [{ nice = 5 }]\n'
    )

    policies = load_policies([policy_dir])
    warnings = shared_comm_warnings(infos, ProtectSelectors.build(comms=["nginx"]), policies)
    assert warnings[0] == ("protect.comm 'nginx' matches processes of several users (uids 0, 33, 1000): a process can "
                           "take any comm, and any of them is protected; give protect.users")
    assert warnings[1].startswith("policy web (") and "match.comm 'nginx' matches processes of several users (uids 0, 33, 1000)" in warnings[1]
    assert len(warnings) == 2  # web-www narrows by user
    with_users = shared_comm_warnings(infos, ProtectSelectors.build(comms=["nginx"], users=[0, 33]), PolicySet(()))
    assert with_users == ["protect.comm 'nginx' matches processes of several users (uids 0, 33, 1000): a process can take "
                          "any comm, and those running as uids 1000 are not protected (protect.users)"]
    assert shared_comm_warnings(infos, ProtectSelectors.build(comms=["nginx"], users=[0, 33, 1000]), PolicySet(())) == []


# -- request CPUs "auto" from cgroups -----------------------------------------------------------------

def fake_cpuset(tmp_path, cpus_of: dict[str, str]) -> CgroupMount:
    """A fake v2 tree: the root allows 0-3, each named cgroup the given CPUs."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpuset.cpus.effective").write_text("0-3\n")
    for path, cpus in cpus_of.items():
        (root / path.strip("/")).mkdir(parents=True)
        (root / path.strip("/") / "cpuset.cpus.effective").write_text(cpus + "\n")
    return CgroupMount(2, root, "/", frozenset({"cpuset"}))


def test_explain_takes_auto_request_cpus_from_the_protected_cgroup_and_ignores_refused_processes(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(10, "api", cgroup_v2="/system.slice/api.service"))
    proc.add(FakeProcess(20, "api", uid=1000, cgroup_v2="/user.slice/user-1000.slice/session-1.scope"))
    proc.write()
    # Thread affinities say every CPU; the unit's cgroup says 2-3.
    for pid in (10, 20):
        (proc.root / str(pid) / "task" / str(pid) / "status").write_text("Cpus_allowed_list:\t0-3\n")
    mount = fake_cpuset(tmp_path, {"/system.slice/api.service": "2-3"})
    online = frozenset(range(4))
    report = explain(PolicySet(()), ProtectSelectors.build(comms=["api"], users=[0]), ProcFS(proc.root), online,
                     self_pid=1, cgroupfs=CgroupFS(), cpuset_mount=mount)
    assert report.request_cpus == {2, 3}
    assert [info.pid for info, _ in report.protected] == [10]
    assert any(note.startswith("not protected: pid 20 (api) matches comm api but runs as uid 1000") for note in report.notes)
    # Without users, the stranger's affinity (every CPU, from an unrestricted cgroup) would widen it.
    report = explain(PolicySet(()), ProtectSelectors.build(comms=["api"]), ProcFS(proc.root), online,
                     self_pid=1, cgroupfs=CgroupFS(), cpuset_mount=mount)
    assert report.request_cpus == online


@pytest.fixture
def request_cpuset(scratch_cpuset):
    """A real v1 cpuset cgroup allowing only the last online CPU (a service's own), removed at teardown."""
    online = sorted(online_cpus())
    if len(online) < 2:
        pytest.skip("needs two online CPUs")
    return scratch_cpuset(str(online[-1])), frozenset({online[-1]})


@pytest.mark.root
def test_auto_request_cpus_come_from_the_real_cpuset_cgroup_of_the_protected_process(spawn, request_cpuset):
    directory, allowed = request_cpuset
    service = spawn(victim_argv(None, "--comm", "svc-request"))
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    stranger = spawn(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *victim_argv(None, "--comm", "svc-request")])
    move_to(directory, service.pid)
    procfs, cgroupfs, mount = ProcFS(), CgroupFS(), discover_cpuset_mount()
    assert process_cpuset_cpus(cgroupfs, mount, procfs.cgroups(service.pid)) == allowed
    selectors = ProtectSelectors.build(comms=["svc-request"], users=[0])
    protected = {pid: procfs.tids(pid) for pid in selectors.resolve(procfs)}
    assert set(protected) == {service.pid}  # the stranger (uid 65534, same comm, every CPU) is refused
    request = auto_request_cpus(protected, online_cpus(),
                                lambda pid: process_cpuset_cpus(cgroupfs, mount, procfs.cgroups(pid)))
    assert request == allowed
    # Before the fix the stranger's affinity counted: every online CPU, so no placement was feasible.
    assert frozenset(os.sched_getaffinity(stranger.pid)) == online_cpus()


# -- a real process spoofing a protected comm -----------------------------------------------------------

@pytest.mark.root
def test_a_real_process_of_another_user_with_the_protected_comm_is_not_protected(spawn, caplog):
    victim = Path(victim_argv(None)[1])
    if not os.access(victim, os.R_OK) or not shutil.which("setpriv"):
        pytest.skip("needs setpriv and a world-readable tests/workloads")
    service = spawn(victim_argv(None, "--comm", "svc-spoof"))
    spoofer = spawn(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     *victim_argv(None, "--comm", "svc-spoof\n<0>x")])
    procfs = ProcFS()
    status = procfs.status(spoofer.pid)
    assert status["Uid"].split()[:2] == ["65534", "65534"] and procfs.stat(spoofer.pid).comm == "svc-spoof\n<0>x"
    source, clock = RecordingSource(), Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["svc-spoof*"], users=[0]), procfs, mono_clock=clock)
    with caplog.at_level(logging.WARNING, logger="remediator.collector"):
        collector.start()
    assert service.pid in collector.protected and spoofer.pid not in collector.protected
    assert not set(spoofer.tids()) & source.kernel_tids
    [warning] = [r.getMessage() for r in caplog.records if f"pid {spoofer.pid}" in r.getMessage()]
    assert warning == (f"not protecting pid {spoofer.pid} (svc-spoof\\n<0>x): matches comm svc-spoof* but runs as "
                       "uid 65534, not as a protect user (0)")
    # Without users the spoofer would be protected: the test can tell the two apart.
    assert spoofer.pid in ProtectSelectors.build(comms=["svc-spoof*"]).resolve(procfs)
