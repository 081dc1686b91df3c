"""Finding the cpuset hierarchy from mountinfo (v1, hybrid, v2-only) and mapping cgroup paths onto it."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.cgroupfs import (
    CgroupFS,
    CgroupMount,
    allowed_cpus,
    discover_cpuset_mount,
    discover_mounts,
    effective_cpus,
    find_cpuset_mount,
    parse_mountinfo,
)
from remediator.procfs import CgroupMembership

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""

V2_ONLY = """\
22 26 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""


def write_v2_root(root: Path, controllers: str) -> None:
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")


def test_v1_cpuset_hierarchy_is_found_on_a_hybrid_host(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(HYBRID)
    mount = discover_cpuset_mount(mountinfo)
    assert mount == CgroupMount(1, Path("/sys/fs/cgroup/cpuset"), "/", frozenset({"cpuset"}))
    assert mount.effective_cpus_file == "cpuset.effective_cpus"


def test_mount_options_are_not_taken_for_controllers():
    systemd = [m for m in parse_mountinfo(HYBRID) if m.mount_point.name == "systemd"][0]
    assert systemd.controllers == {"name=systemd"}


def test_v2_only_host_uses_the_unified_tree_when_it_offers_cpuset(tmp_path):
    root = tmp_path / "cgroup"
    write_v2_root(root, "cpuset cpu io memory pids")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V2_ONLY.replace("/sys/fs/cgroup", str(root)))
    mount = discover_cpuset_mount(mountinfo)
    assert mount is not None and mount.version == 2 and mount.mount_point == root
    assert mount.effective_cpus_file == "cpuset.cpus.effective"


def test_v2_tree_without_cpuset_gives_no_hierarchy(tmp_path):
    root = tmp_path / "cgroup"
    write_v2_root(root, "cpu io memory pids")  # cpuset bound elsewhere, or not built in
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V2_ONLY.replace("/sys/fs/cgroup", str(root)))
    assert discover_cpuset_mount(mountinfo) is None


def test_v1_wins_over_v2_because_a_controller_lives_on_one_hierarchy(tmp_path):
    mounts = [
        CgroupMount(2, Path("/sys/fs/cgroup/unified"), "/", frozenset({"cpuset"})),
        CgroupMount(1, Path("/sys/fs/cgroup/cpuset"), "/", frozenset({"cpuset"})),
    ]
    assert find_cpuset_mount(mounts).version == 1


def test_escaped_mount_points_and_bind_mounted_subtrees():
    [mount] = parse_mountinfo(r"41 31 0:38 /kubepods/pod1 /run/my\040cgroup rw - cgroup2 cgroup2 rw" + "\n")
    assert mount.mount_point == Path("/run/my cgroup")
    assert mount.fs_path("/kubepods/pod1/app") == Path("/run/my cgroup/app")
    assert mount.fs_path("/kubepods/pod1") == Path("/run/my cgroup")
    assert mount.fs_path("/system.slice") is None  # outside what is mounted there
    assert mount.cgroup_path(Path("/run/my cgroup/app")) == "/kubepods/pod1/app"


def test_v2_effective_cpus_come_from_the_nearest_cgroup_with_the_file(tmp_path):
    root = tmp_path / "cgroup"
    write_v2_root(root, "cpuset")
    (root / "cpuset.cpus.effective").write_text("0-3\n")
    (root / "app.slice" / "svc.service").mkdir(parents=True)
    (root / "app.slice" / "cpuset.cpus.effective").write_text("2-3\n")
    mount = CgroupMount(2, root, "/", frozenset({"cpuset"}))
    # svc.service has no cpuset files (the controller is not enabled for it): it inherits app.slice's.
    assert effective_cpus(CgroupFS(), mount, "/app.slice/svc.service") == (frozenset({2, 3}), "/app.slice")
    membership = CgroupMembership(v2_path="/app.slice/svc.service")
    assert allowed_cpus(CgroupFS(), mount, membership) == (frozenset({2, 3}), "cpuset /app.slice")


def test_without_a_cpuset_hierarchy_affinity_falls_back_to_online_cpus(tmp_path):
    sysfs = tmp_path / "sys"
    (sysfs / "devices/system/cpu").mkdir(parents=True)
    (sysfs / "devices/system/cpu/online").write_text("0-5\n")
    assert allowed_cpus(CgroupFS(), None, CgroupMembership(), sysfs) == (frozenset(range(6)), "online CPUs")


@pytest.mark.root
def test_this_host_reports_its_real_cpuset_hierarchy():
    mounts = discover_mounts()
    mount = find_cpuset_mount(mounts)
    assert mount is not None
    assert (mount.mount_point / mount.effective_cpus_file).exists()
    found = effective_cpus(CgroupFS(), mount, "/")
    assert found is not None and found[0]


def test_a_cgroup_path_cannot_climb_out_of_the_mount():
    mount = CgroupMount(1, Path("/sys/fs/cgroup/cpuset"), "/", frozenset({"cpuset"}))
    assert mount.fs_path("/../../../etc") is None
    assert mount.fs_path("/a/../b") is None
    assert mount.fs_path("/a/b") == Path("/sys/fs/cgroup/cpuset/a/b")


# -- whether a cpuset step can work on this host at all (`policy check --host`) -------------------

def unavailable_on(tmp_path, mountinfo_text: str, v2_controllers: str | None = None) -> str | None:
    """The cpuset kind's answer for a host with this mountinfo; MNT in it is a directory of tmp_path,
    and a cgroup2 line's tree gets a root cgroup.controllers with `v2_controllers`."""
    from remediator.actuators.cpuset import cpuset_steps_unavailable

    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2_controllers is not None:
        write_v2_root(tmp_path / "cgroup", v2_controllers)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(mountinfo_text.replace("MNT", str(tmp_path / "cgroup")))
    return cpuset_steps_unavailable(discover_mounts(mountinfo))


V1_NO_CPUSET = """\
31 23 0:28 / MNT rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / MNT/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / MNT/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / MNT/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""


def test_a_host_with_cpuset_on_v1_or_v2_has_cpuset_steps(tmp_path):
    assert unavailable_on(tmp_path / "v1", HYBRID.replace("/sys/fs/cgroup", "MNT")) is None
    assert unavailable_on(tmp_path / "v2", V2_ONLY.replace("/sys/fs/cgroup", "MNT"), v2_controllers="cpuset cpu io memory pids") is None


def test_a_v2_tree_without_cpuset_in_the_roots_controllers_is_named(tmp_path):
    text = unavailable_on(tmp_path, V2_ONLY.replace("/sys/fs/cgroup", "MNT"), v2_controllers="cpu io memory pids")
    assert text == (f"not available on this host: the cgroup v2 tree at {tmp_path / 'cgroup'} does not list cpuset in "
                    "cgroup.controllers (it lists: cpu io memory pids)")


def test_v1_hierarchies_without_cpuset_are_named(tmp_path):
    assert unavailable_on(tmp_path, V1_NO_CPUSET) == (
        "not available on this host: no cgroup v1 cpuset hierarchy is mounted (v1 hierarchies: cpu,cpuacct; memory; name=systemd)")


def test_a_hybrid_host_names_both_hierarchies(tmp_path):
    hybrid = V1_NO_CPUSET + "41 31 0:38 / MNT/unified rw,nsdelegate - cgroup2 cgroup2 rw,nsdelegate\n"
    (tmp_path / "cgroup").mkdir()
    write_v2_root(tmp_path / "cgroup" / "unified", "")  # a hybrid host's v2 tree takes no controller
    assert unavailable_on(tmp_path, hybrid) == (
        "not available on this host: no cgroup v1 cpuset hierarchy is mounted (v1 hierarchies: cpu,cpuacct; memory; name=systemd), "
        f"and the cgroup v2 tree at {tmp_path / 'cgroup' / 'unified'} does not list cpuset in cgroup.controllers (it lists: nothing)")


def test_no_cgroup_filesystem_at_all_is_said(tmp_path):
    no_cgroups = "22 26 0:21 / /proc rw,nosuid - proc proc rw\n25 26 0:23 / /sys rw,nosuid - sysfs sysfs rw\n"
    assert unavailable_on(tmp_path, no_cgroups) == (
        "not available on this host: no cgroup filesystem is mounted (no cgroup or cgroup2 line in /proc/self/mountinfo)")


def test_an_unreadable_mountinfo_leaves_no_cpuset_step_either(tmp_path, monkeypatch):
    from remediator.actuators import cpuset as cpuset_module

    monkeypatch.setattr(cpuset_module, "discover_mounts", lambda: discover_mounts(tmp_path / "mountinfo"))
    assert cpuset_module.CPUSET.unavailable() == (
        f"not available on this host: cannot read {tmp_path / 'mountinfo'} (No such file or directory) to find a cpuset hierarchy")
