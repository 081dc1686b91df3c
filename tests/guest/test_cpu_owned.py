"""cpu_weight and cpu_idle on cgroup v2 with no systemd manager to go through: what a host without
systemd (OpenRC, runit, a container's init) runs. The actuators are built as `default_actuators`
builds them there, with no SystemdManager, on this guest's real cgroup v2 tree: the offender moves
into remediator-POLICY under the root (after "+cpu" in the root's subtree_control where missing),
cpu.weight and cpu.idle are written there, and a revert (also `remediator revert --all` after a
SIGKILL) writes it back where it was, removes the group and takes "+cpu" back out of the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.remediation import close, identity_of, make_executor
from remediator.model import ActionRequest
from units import JOURNAL, cgroup_of, cpu_step_then_sigkill, hog_in_group, revert_all, wait_for

pytestmark = pytest.mark.root

TREE = Path("/sys/fs/cgroup")
BEFORE = TREE / "guest-plain"  # a group some tool made, holding no limits
GROUP = "guest-plain"
OURS = TREE / f"remediator-{GROUP}"
NO_SYSTEMD = {"systemd": None}  # default_actuators' choice where systemd is not PID 1


def cpu_request(pid: int, setting: tuple, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "cpu", GROUP, step, {"cpu": dict(setting), "group": GROUP})


def remove_our_group() -> None:
    """A failed test's leftover: empty once the hog is gone."""
    if OURS.exists():
        wait_for(lambda: not (OURS / "cgroup.procs").read_text().split(), 10, f"{OURS} empty")
        OURS.rmdir()


@pytest.fixture
def hog():
    with hog_in_group(BEFORE, "plain-hog", after_kill=remove_our_group) as pid:
        yield pid


@pytest.fixture
def executor():
    made = make_executor(JOURNAL, **NO_SYSTEMD)
    yield made
    close(made)


def every_thread_in(pid: int, cgroup: str) -> bool:
    return all(Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().strip() == f"0::{cgroup}" for tid in os.listdir(f"/proc/{pid}/task"))


def root_controllers() -> list[str]:
    return (TREE / "cgroup.subtree_control").read_text().split()


def test_weight_then_idle_in_our_own_group_on_the_real_tree_and_back(hog, executor):
    before = root_controllers()
    weight = executor.apply(cpu_request(hog, (("weight", 10),)), ())
    print(weight.message)
    assert weight.status == "applied", weight
    assert f"mkdir {OURS}, write 10 to {OURS}/cpu.weight, write {hog} to {OURS}/cgroup.procs (was /{GROUP})" in weight.message
    assert not weight.message.startswith("systemd")
    assert "cpu" in (TREE / "cgroup.subtree_control").read_text().split()
    assert cgroup_of(hog) == f"/remediator-{GROUP}"
    assert every_thread_in(hog, f"/remediator-{GROUP}")
    assert (OURS / "cpu.weight").read_text().strip() == "10"

    higher = executor.apply(cpu_request(hog, (("weight", 50),), step=1), ())
    assert higher.status == "unchanged", higher  # never a raise
    idle = executor.apply(cpu_request(hog, (("idle", 1),), step=2), ())
    print(idle.message)
    assert idle.status == "applied", idle
    assert idle.message == f"write 1 to {OURS}/cpu.idle (was /remediator-{GROUP})"
    assert (OURS / "cpu.idle").read_text().strip() == "1"
    [entry] = executor.active()
    assert entry.original["cgroup"] == f"/{GROUP}" and entry.original["version"] == 2

    [restored] = executor.restore()
    print(restored.message)
    assert restored.status == "restored", restored
    assert cgroup_of(hog) == f"/{GROUP}"
    assert every_thread_in(hog, f"/{GROUP}")
    assert not OURS.exists(), "the emptied group is removed"
    # "+cpu" goes back out of the root where remediator put it there (nothing else uses it).
    assert root_controllers() == before, restored.message
    if "cpu" not in before:
        assert f"write -cpu to {TREE}/cgroup.subtree_control" in restored.message


def test_after_a_sigkill_revert_all_moves_it_back_and_removes_the_group(hog):
    before = root_controllers()
    crashed = cpu_step_then_sigkill(hog, (("idle", 1),), GROUP, executor_options=", systemd=None")
    assert crashed.stdout.strip() == "applied", crashed.stdout + crashed.stderr
    assert cgroup_of(hog) == f"/remediator-{GROUP}"
    assert (OURS / "cpu.idle").read_text().strip() == "1"

    out = revert_all()
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert cgroup_of(hog) == f"/{GROUP}"
    assert not OURS.exists()
    assert root_controllers() == before, out.stdout
