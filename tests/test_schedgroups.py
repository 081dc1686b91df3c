"""Scheduling groups on fake procfs and cgroup trees, and the pure judgement of who a nice step can reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.fakeproc import FakeProc, FakeProcess
from remediator.cgroupfs import CgroupFS, CgroupMount
from remediator.procfs import ProcFS
from remediator.schedgroups import SchedGroups, can_affect, parse_autogroup, unreachable_reason


@pytest.mark.parametrize("offender, protected, expected", [
    ("autogroup-4", "autogroup-4", True),  # one session: nice weighs them against each other
    ("autogroup-5", "autogroup-4", False),  # two sessions
    ("/", "autogroup-4", True),  # a root task competes with the autogroup's entity
    ("autogroup-4", "/", False),
    ("/system.slice/a.service", "/system.slice/b.service", False),
    ("/system.slice", "/system.slice/b.service", True),  # b's entity sits in system.slice's queue
    ("/system.slice/b.service", "/system.slice", False),
    ("/system.slice/b.service", "/system.slice/b.service/worker", True),
    ("/system.slice/b.service", "/system.slice/b.serviceX", False),
    ("", "autogroup-4", None),  # unknown: cannot tell
])
def test_who_a_nice_step_can_reach(offender, protected, expected):
    assert can_affect(offender, protected) is expected


def test_the_reason_names_both_groups_and_only_group_weighted_steps_get_one():
    why = unreachable_reason("nice", (200, "fluent-bit", "autogroup-5"), [(100, "api", "autogroup-4")])
    assert "fluent-bit (200) is in autogroup-5" in why and "api (100) in autogroup-4" in why
    assert unreachable_reason("affinity", (200, "fluent-bit", "autogroup-5"), [(100, "api", "autogroup-4")]) is None
    assert unreachable_reason("sched", (200, "x", "autogroup-5"), [(100, "a", "autogroup-4"), (101, "b", "autogroup-5")]) is None
    assert unreachable_reason("nice", (200, "x", "autogroup-5"), []) is None  # nothing protected running
    assert unreachable_reason("nice", (200, "x", ""), [(100, "a", "autogroup-4")]) is None


def test_parse_autogroup():
    assert parse_autogroup("/autogroup-123 nice 0\n") == "autogroup-123"
    assert parse_autogroup("") == "/"


def v1_mount(tmp_path: Path) -> CgroupMount:
    (tmp_path / "cpu").mkdir()
    return CgroupMount(1, tmp_path / "cpu", "/", frozenset({"cpu", "cpuacct"}))


def v2_tree(tmp_path: Path) -> CgroupMount:
    root = tmp_path / "unified"
    for path, controllers in [("", "cpuset cpu io memory pids"), ("system.slice", "cpu memory pids"),
                              ("system.slice/api.service", "memory pids"), ("system.slice/ship.service", "cpu memory pids"),
                              ("user.slice", "memory pids")]:
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cgroup.controllers").write_text(controllers + "\n")
    return CgroupMount(2, root, "/", frozenset({"cpuset", "cpu", "io", "memory", "pids"}))


def test_v1_root_cpu_cgroup_with_autogroups(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.autogroup_enabled = 1
    proc.add(FakeProcess(100, "api", cgroup_v1={"cpu,cpuacct": "/"}, autogroup="/autogroup-4 nice 0"))
    proc.add(FakeProcess(200, "fluent-bit", cgroup_v1={"cpu,cpuacct": "/"}, autogroup="/autogroup-9 nice 0"))
    proc.add(FakeProcess(300, "batch", cgroup_v1={"cpu,cpuacct": "/batch"}, autogroup="/autogroup-9 nice 0"))
    proc.add(FakeProcess(400, "init-child", cgroup_v1={"cpu,cpuacct": "/"}, autogroup=""))
    now = [0.0]
    groups = SchedGroups(ProcFS(proc.write()), v1_mount(tmp_path), clock=lambda: now[0])
    assert [groups.group_of(pid) for pid in (100, 200, 300, 400)] == ["autogroup-4", "autogroup-9", "/batch", "/"]
    proc.autogroup_enabled = 0
    proc.write()
    now[0] += 60.0  # the setting is read again (see the test below)
    assert groups.group_of(200) == "/"  # autogroups off: one root group


def test_no_autogroup_file_and_no_sysctl_is_the_root_group(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(100, "api", cgroup_v1={"cpu": "/"}))
    groups = SchedGroups(ProcFS(proc.write()), v1_mount(tmp_path))
    assert groups.group_of(100) == "/"
    assert groups.procfs.autogroup(100) == ""


def test_v2_the_group_is_where_the_cpu_controller_is_enabled(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.autogroup_enabled = 1
    proc.add(FakeProcess(100, "api", cgroup_v2="/system.slice/api.service", autogroup="/autogroup-4 nice 0"))
    proc.add(FakeProcess(200, "fluent-bit", cgroup_v2="/system.slice/ship.service", autogroup="/autogroup-5 nice 0"))
    proc.add(FakeProcess(300, "shell", cgroup_v2="/user.slice", autogroup="/autogroup-6 nice 0"))
    groups = SchedGroups(ProcFS(proc.write()), v2_tree(tmp_path))
    # api.service has no cpu controller of its own: it is scheduled in system.slice's group
    assert groups.group_of(100) == "/system.slice"
    assert groups.group_of(200) == "/system.slice/ship.service"
    assert groups.group_of(300) == "autogroup-6"  # user.slice without cpu: the root group, so its autogroup
    assert can_affect(groups.group_of(200), groups.group_of(100)) is False


def test_no_cpu_controller_mounted_means_one_group_or_autogroups(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(100, "api", autogroup="/autogroup-4 nice 0"))
    groups = SchedGroups(ProcFS(proc.write()), None)
    assert groups.group_of(100) == "/"


def test_an_unreadable_cgroup_is_unknown_not_a_guess(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(100, "api", cgroup_v2="/gone/deeper"))
    groups = SchedGroups(ProcFS(proc.write()), v2_tree(tmp_path))
    assert groups.group_of(100) == ""


def test_the_autogroup_setting_is_read_again_only_after_it_was_kept_a_while(tmp_path):
    from remediator.schedgroups import AUTOGROUP_SETTING_KEPT_S

    proc = FakeProc(tmp_path / "proc")
    proc.autogroup_enabled = 1
    proc.add(FakeProcess(100, "api", autogroup="/autogroup-4 nice 0"))
    now = [1000.0]
    groups = SchedGroups(ProcFS(proc.write()), None, clock=lambda: now[0])
    assert groups.group_of(100) == "autogroup-4"
    proc.autogroup_enabled = 0  # sysctl kernel.sched_autogroup_enabled=0
    proc.write()
    now[0] += AUTOGROUP_SETTING_KEPT_S - 0.5
    assert groups.group_of(100) == "autogroup-4"  # the setting as read, not a file read per process
    now[0] += 1.0
    assert groups.group_of(100) == "/"


def test_a_v2_cgroups_controllers_are_read_again_only_after_they_were_kept_a_while(tmp_path):
    """Every process of system.slice walks up through it: its cgroup.controllers is read once per
    CONTROLLERS_KEPT_S, not once per process; a unit given CPUWeight= since is seen after that."""
    from remediator.schedgroups import CONTROLLERS_KEPT_S

    proc = FakeProc(tmp_path / "proc")
    for pid in range(100, 110):
        proc.add(FakeProcess(pid, f"worker{pid}", cgroup_v2="/system.slice/api.service"))
    mount = v2_tree(tmp_path)
    reads: list[str] = []

    class CountingCgroupFS(CgroupFS):
        def read(self, path):
            reads.append(str(path.relative_to(mount.mount_point)))
            return super().read(path)

    now = [1000.0]
    groups = SchedGroups(ProcFS(proc.write()), mount, CountingCgroupFS(), clock=lambda: now[0])
    assert {groups.group_of(pid) for pid in range(100, 110)} == {"/system.slice"}
    assert reads == ["system.slice/api.service/cgroup.controllers", "system.slice/cgroup.controllers"]
    (mount.mount_point / "system.slice/api.service/cgroup.controllers").write_text("cpu memory pids\n")  # CPUWeight=
    now[0] += CONTROLLERS_KEPT_S - 0.5
    assert groups.group_of(100) == "/system.slice"  # as read
    now[0] += 1.0
    assert groups.group_of(100) == "/system.slice/api.service"
    assert len(reads) == 3


def test_the_collector_reads_a_new_processs_cgroup_file_once_for_its_unit_and_its_group(tmp_path):
    from remediator.collector import Collector
    from remediator.selectors import ProtectSelectors

    from helpers.sources import Clock, RecordingSource

    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(100, "api", cgroup_v2="/system.slice/api.service"))
    proc.add(FakeProcess(200, "vector", cgroup_v2="/system.slice/ship.service"))
    reads: list[int] = []

    class CountingProcFS(ProcFS):
        def cgroups(self, pid):
            reads.append(pid)
            return super().cgroups(pid)

    procfs = CountingProcFS(proc.write())
    collector = Collector(RecordingSource(), ProtectSelectors.build(pids=[100]), procfs, mono_clock=Clock(),
                          sched_groups=SchedGroups(procfs, v2_tree(tmp_path)))
    info = collector.info(200)
    assert (info.unit, info.sched_group) == ("ship.service", "/system.slice/ship.service")
    assert reads == [200]
