"""cpu_weight, cpu_idle and cpu_max on a real process, through this host's cgroup v1 cpu hierarchy:
the process moves into remediator-POLICY with the setting, later steps add to it, nothing is ever
raised, and a revert moves it back and removes the group. (The systemd path runs in the guests.)"""

from __future__ import annotations

import os

import pytest

from helpers.cgroups import cgroup_path_of, evacuate_and_remove
from helpers.remediation import identity_of, new_executor  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator.cgroupfs import discover_cpu_mount
from remediator.model import ActionRequest

pytestmark = pytest.mark.root
NOBODY = 65534
SLEEPER = ["sh", "-c", "echo ready; exec sleep 600"]  # any user can run it, wherever the checkout is


@pytest.fixture
def cpu_hierarchy():
    mount = discover_cpu_mount()
    if mount is None or mount.version != 1:
        pytest.skip("needs the cgroup v1 cpu hierarchy (this host's); the v2 path is tested in the guests")
    return mount


@pytest.fixture
def policy_name(cpu_hierarchy):
    """A group name of this test's own, removed at teardown even when the test fails."""
    name = f"test-cpu-{os.getpid()}"
    yield name
    for directory in (cpu_hierarchy.mount_point / f"remediator-{name}", cpu_hierarchy.mount_point / f"remediator-{name}.uid{NOBODY}"):
        if directory.exists():
            evacuate_and_remove(directory, cpu_hierarchy.mount_point)


def cpu_request(pid: int, policy: str, setting: tuple, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "cpu", policy, step, {"cpu": dict(setting), "group": policy})


def cpu_cgroup(pid: int) -> str:
    return cgroup_path_of(pid, "cpu")


def test_weight_then_idle_then_revert_moves_it_back_and_removes_the_group(spawn, new_executor, cpu_hierarchy, policy_name):
    hog = spawn(hog_argv(threads=2))
    before = cpu_cgroup(hog.pid)
    group = cpu_hierarchy.mount_point / f"remediator-{policy_name}"
    executor = new_executor()

    first = executor.apply(cpu_request(hog.pid, policy_name, (("weight", 10),)), ())

    assert first.status == "applied", first
    assert cpu_cgroup(hog.pid) == f"/remediator-{policy_name}"
    assert (group / "cpu.shares").read_text().strip() == "102"  # weight 10 of 100 is 102 of 1024
    assert sorted(int(t) for t in os.listdir(f"/proc/{hog.pid}/task")) == sorted(int(t) for t in (group / "tasks").read_text().split())
    assert first.message.endswith(f"(was {before})")

    second = executor.apply(cpu_request(hog.pid, policy_name, (("idle", 1),), step=1), ())
    assert second.status == "applied", second
    assert (group / "cpu.idle").read_text().strip() == "1"
    [entry] = executor.active()
    assert entry.original["cgroup"] == before  # the first step's original is kept

    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert cpu_cgroup(hog.pid) == before
    assert not group.exists(), "the emptied group is removed"


def test_never_a_raise_a_higher_weight_or_a_looser_quota_is_unchanged(spawn, new_executor, cpu_hierarchy, policy_name):
    hog = spawn(hog_argv(threads=1))
    group = cpu_hierarchy.mount_point / f"remediator-{policy_name}"
    executor = new_executor()
    assert executor.apply(cpu_request(hog.pid, policy_name, (("weight", 10),)), ()).status == "applied"
    assert executor.apply(cpu_request(hog.pid, policy_name, (("weight", 50),), step=1), ()).status == "unchanged"
    assert (group / "cpu.shares").read_text().strip() == "102"

    quota = executor.apply(cpu_request(hog.pid, policy_name, (("quota_us", 20_000), ("period_us", 100_000)), step=2), ())
    assert quota.status == "applied", quota
    assert (group / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (group / "cpu.cfs_quota_us").read_text().strip() == "20000"
    looser = executor.apply(cpu_request(hog.pid, policy_name, (("quota_us", 50_000), ("period_us", 100_000)), step=3), ())
    assert looser.status == "unchanged", looser
    assert (group / "cpu.cfs_quota_us").read_text().strip() == "20000"
    executor.restore()
    assert not group.exists()


def test_a_process_moved_elsewhere_since_is_left_where_it_is(spawn, new_executor, cpu_hierarchy, policy_name):
    hog = spawn(hog_argv(threads=1))
    executor = new_executor()
    assert executor.apply(cpu_request(hog.pid, policy_name, (("weight", 10),)), ()).status == "applied"
    elsewhere = cpu_hierarchy.mount_point / f"remediator-{policy_name}-operator"
    elsewhere.mkdir()
    try:
        (elsewhere / "cgroup.procs").write_text(str(hog.pid))  # an operator's move after ours
        [restored] = executor.restore()
        assert restored.status == "left-changed-by-other", restored
        assert restored.left == {"cgroup": f"/remediator-{policy_name}-operator", "set": f"/remediator-{policy_name}"}
        assert "left as it is" in restored.message
        assert cpu_cgroup(hog.pid) == f"/remediator-{policy_name}-operator"
        assert not (cpu_hierarchy.mount_point / f"remediator-{policy_name}").exists()
    finally:
        (cpu_hierarchy.mount_point / "cgroup.procs").write_text(str(hog.pid))
        elsewhere.rmdir()


def test_dry_run_names_the_files_and_changes_nothing(spawn, new_executor, cpu_hierarchy, policy_name):
    hog = spawn(hog_argv(threads=1))
    before = cpu_cgroup(hog.pid)
    executor = new_executor(None, dry_run=True)
    outcome = executor.apply(cpu_request(hog.pid, policy_name, (("quota_us", 20_000), ("period_us", 100_000))), ())
    assert outcome.status == "would-apply", outcome
    group = cpu_hierarchy.mount_point / f"remediator-{policy_name}"
    assert outcome.message == (
        f"mkdir {group}, write 100000 to {group}/cpu.cfs_period_us, write 20000 to {group}/cpu.cfs_quota_us, "
        f"write {hog.pid} to {group}/cgroup.procs (was {before})"
    )
    assert cpu_cgroup(hog.pid) == before and not group.exists()


def test_a_process_under_a_cpu_quota_is_not_moved_out_of_it(spawn, new_executor, cpu_hierarchy, policy_name):
    """A container's --cpus (or a unit's CPUQuota=) on a v1 host is cpu.cfs_quota_us on its cpu
    cgroup: moved into remediator's group, the process would escape it. Refused, left where it is."""
    limited = cpu_hierarchy.mount_point / f"test-limited-{os.getpid()}"
    limited.mkdir()
    try:
        (limited / "cpu.cfs_quota_us").write_text("50000")
        hog = spawn(hog_argv(threads=1))
        (limited / "cgroup.procs").write_text(str(hog.pid))
        executor = new_executor()

        outcome = executor.apply(cpu_request(hog.pid, policy_name, (("idle", 1),)), ())

        assert outcome.status == "invalid", outcome
        assert "would lift the quota of its cgroup" in outcome.message and "cpu.cfs_quota_us='50000'" in outcome.message
        assert cpu_cgroup(hog.pid) == f"/{limited.name}"
        assert not (cpu_hierarchy.mount_point / f"remediator-{policy_name}").exists()
        assert executor.active() == []
    finally:
        evacuate_and_remove(limited, cpu_hierarchy.mount_point)


def test_another_users_offender_gets_a_group_of_its_own(spawn, new_executor, cpu_hierarchy, policy_name):
    """A local user's look-alike of a shipper, escalated to cpu_idle, must not idle root's real
    one: a group's setting reaches everyone in it, so each user's offenders get their own group."""
    roots = spawn(SLEEPER)
    users = spawn(SLEEPER, user=NOBODY)
    executor = new_executor()
    group = cpu_hierarchy.mount_point / f"remediator-{policy_name}"
    theirs = cpu_hierarchy.mount_point / f"remediator-{policy_name}.uid{NOBODY}"

    steps = [executor.apply(cpu_request(roots.pid, policy_name, (("weight", 10),)), ()),
             executor.apply(cpu_request(users.pid, policy_name, (("weight", 10),)), ()),
             executor.apply(cpu_request(users.pid, policy_name, (("idle", 1),), step=1), ())]

    assert [outcome.status for outcome in steps] == ["applied"] * 3, steps
    assert cpu_cgroup(roots.pid) == f"/{group.name}" and cpu_cgroup(users.pid) == f"/{theirs.name}"
    assert (theirs / "cpu.idle").read_text().strip() == "1"
    assert (group / "cpu.idle").read_text().strip() == "0", "root's group keeps its own step"

    restored = executor.restore()
    assert [outcome.status for outcome in restored] == ["restored", "restored"], restored
    assert not group.exists() and not theirs.exists()
