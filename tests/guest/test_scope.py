"""A cpu step on an offender that belongs to no systemd unit: it moves into remediator's own
transient scope (remediator-POLICY.scope) with the property, set by systemd, and a revert writes it
back into the cgroup it came from and leaves no scope, no cgroup and no drop-in behind, after a
crash too. A process whose cgroup holds limits is never moved out of them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers.remediation import close, identity_of, make_executor
from remediator.model import ActionRequest
from units import JOURNAL, cgroup_of, cpu_step_then_sigkill, hog_in_group, revert_all, show, wait_for

pytestmark = pytest.mark.root

FOREIGN = Path("/sys/fs/cgroup/guest-foreign")  # a group another tool made: in no unit
SCOPE = "remediator-guest-foreign.scope"
SCOPE_CGROUP = f"/system.slice/{SCOPE}"
DROPINS = Path("/run/systemd/system.control") / f"{SCOPE}.d"


def scope_gone() -> bool:
    return show(SCOPE, "ActiveState")["ActiveState"] in ("inactive", "failed") and not Path("/sys/fs/cgroup" + SCOPE_CGROUP).exists()


@pytest.fixture
def foreign():
    with hog_in_group(FOREIGN, "foreign-hog", after_kill=lambda: subprocess.run(["systemctl", "stop", SCOPE], capture_output=True, timeout=60)) as pid:
        yield pid


def cpu_request(pid: int, setting: tuple, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "cpu", "guest-foreign", step, {"cpu": dict(setting), "group": "guest-foreign"})


@pytest.fixture
def executor():
    made = make_executor(JOURNAL)
    yield made
    close(made)


def test_an_offender_in_no_unit_moves_into_our_scope_and_back(foreign, executor):
    weight = executor.apply(cpu_request(foreign, (("weight", 10),)), ())
    print(weight.message)
    assert weight.status == "applied", weight
    assert weight.message.startswith(f"systemd StartTransientUnit {SCOPE}")
    assert cgroup_of(foreign) == SCOPE_CGROUP
    assert show(SCOPE, "CPUWeight")["CPUWeight"] == "10"
    # Every thread moved with it: cgroup.procs moves the whole process.
    for tid in os.listdir(f"/proc/{foreign}/task"):
        assert Path(f"/proc/{foreign}/task/{tid}/cgroup").read_text().strip().endswith(SCOPE_CGROUP)

    idle = executor.apply(cpu_request(foreign, (("idle", 1),), step=1), ())
    print(idle.message)
    assert idle.status == "applied", idle
    assert show(SCOPE, "CPUWeight")["CPUWeight"] == "idle"

    [restored] = executor.restore()
    print(restored.message)
    assert restored.status == "restored", restored
    assert cgroup_of(foreign) == "/guest-foreign"
    wait_for(scope_gone, 10, f"{SCOPE} stopped and its cgroup gone")
    assert not DROPINS.exists(), sorted(os.listdir(DROPINS))


def test_after_a_crash_revert_all_moves_it_back_and_stops_the_scope(foreign):
    crashed = cpu_step_then_sigkill(foreign, (("idle", 1),), "guest-foreign")
    assert crashed.stdout.strip() == "applied", crashed.stdout + crashed.stderr
    assert cgroup_of(foreign) == SCOPE_CGROUP

    out = revert_all()
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert cgroup_of(foreign) == "/guest-foreign"
    wait_for(scope_gone, 10, f"{SCOPE} stopped and its cgroup gone")


def test_a_process_in_a_cgroup_with_limits_is_not_moved_out_of_them(foreign, executor):
    controllers = Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split()
    if "pids" not in controllers:
        pytest.skip(f"the pids controller is not enabled in the root ({controllers})")
    (FOREIGN / "pids.max").write_text("100")
    outcome = executor.apply(cpu_request(foreign, (("weight", 10),)), ())
    print(outcome.message)
    assert outcome.status == "invalid", outcome
    assert "pids.max" in outcome.message
    assert cgroup_of(foreign) == "/guest-foreign"
    assert scope_gone()


def masks(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_a_cpuset_step_gives_our_scope_allowed_cpus_and_the_revert_every_thread_its_mask(foreign, executor):
    before = masks(foreign)
    request = ActionRequest(identity_of(foreign), "cpuset", "guest-foreign", 0, {"cgroup": "guest-foreign", "cpus": [1]})
    moved = executor.apply(request, ())
    print(moved.message)
    assert moved.status == "applied", moved
    assert cgroup_of(foreign) == SCOPE_CGROUP
    assert show(SCOPE, "AllowedCPUs")["AllowedCPUs"] == "1"
    wait_for(lambda: masks(foreign) == {frozenset({1})}, 10, "every thread on CPU 1")

    [restored] = executor.restore()
    print(restored.message)
    assert restored.status == "restored", restored
    assert cgroup_of(foreign) == "/guest-foreign"
    wait_for(lambda: masks(foreign) == before, 10, "every thread's mask as before")
    wait_for(scope_gone, 10, f"{SCOPE} stopped and its cgroup gone")
    assert not DROPINS.exists(), sorted(os.listdir(DROPINS))


NOBODY = 65534
NOBODYS_SCOPE = f"remediator-guest-foreign.uid{NOBODY}.scope"


def test_another_users_offender_gets_a_scope_of_its_own(foreign, executor):
    """A scope's CPUWeight reaches every process in it: a local user's look-alike escalated to
    cpu_idle must not idle root's offender, nor (the unit path refusing a change that reaches
    another user) block root's next step. Each user's offenders get a scope of their own."""
    sleeper = subprocess.Popen(["sleep", "600"], user=NOBODY)
    try:
        (FOREIGN / "cgroup.procs").write_text(str(sleeper.pid))
        steps = [executor.apply(cpu_request(foreign, (("weight", 10),)), ()),
                 executor.apply(cpu_request(sleeper.pid, (("weight", 10),)), ()),
                 executor.apply(cpu_request(sleeper.pid, (("idle", 1),), step=1), ()),
                 executor.apply(cpu_request(foreign, (("weight", 5),), step=1), ())]
        print("\n".join(step.message for step in steps))
        assert [step.status for step in steps] == ["applied"] * 4, steps
        assert cgroup_of(foreign) == SCOPE_CGROUP
        assert cgroup_of(sleeper.pid) == f"/system.slice/{NOBODYS_SCOPE}"
        assert show(NOBODYS_SCOPE, "CPUWeight")["CPUWeight"] == "idle"
        assert show(SCOPE, "CPUWeight")["CPUWeight"] == "5"

        restored = executor.restore()
        print("\n".join(outcome.message for outcome in restored))
        assert [outcome.status for outcome in restored] == ["restored", "restored"], restored
        assert cgroup_of(foreign) == "/guest-foreign" and cgroup_of(sleeper.pid) == "/guest-foreign"
        wait_for(scope_gone, 10, f"{SCOPE} stopped and its cgroup gone")
        wait_for(lambda: show(NOBODYS_SCOPE, "ActiveState")["ActiveState"] in ("inactive", "failed"), 10, f"{NOBODYS_SCOPE} stopped")
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
        subprocess.run(["systemctl", "stop", NOBODYS_SCOPE], capture_output=True, timeout=60)
