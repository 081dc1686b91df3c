"""A cpu step on an offender that belongs to no systemd unit: it moves into remediator's own
transient scope (remediator-POLICY.scope) with the property, set by systemd, and a revert writes it
back into the cgroup it came from and leaves no scope, no cgroup and no drop-in behind, after a
crash too. A process whose cgroup holds limits is never moved out of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.remediation import close, identity_of, make_executor
from remediator.model import ActionRequest
from units import CONFIG, JOURNAL, REMEDIATOR, WORKLOADS, cgroup_of, show, wait_for, write_root_file

pytestmark = pytest.mark.root

FOREIGN = Path("/sys/fs/cgroup/guest-foreign")  # a group another tool made: in no unit
SCOPE = "remediator-guest-foreign.scope"
SCOPE_CGROUP = f"/system.slice/{SCOPE}"
DROPINS = Path("/run/systemd/system.control") / f"{SCOPE}.d"
CONFIG_TEXT = f"""
[protect]
pids = [1]
[daemon]
mode = "live"
policies = []
journal = "{JOURNAL}"
"""


def scope_gone() -> bool:
    return show(SCOPE, "ActiveState")["ActiveState"] in ("inactive", "failed") and not Path("/sys/fs/cgroup" + SCOPE_CGROUP).exists()


@pytest.fixture
def foreign():
    saved = CONFIG.read_text() if CONFIG.exists() else None
    write_root_file(CONFIG, CONFIG_TEXT)
    FOREIGN.mkdir()
    hog = subprocess.Popen([sys.executable, str(WORKLOADS / "hog.py"), "--comm", "foreign-hog", "--threads", "2"])
    try:
        (FOREIGN / "cgroup.procs").write_text(str(hog.pid))
        assert cgroup_of(hog.pid) == "/guest-foreign"
        yield hog.pid
    finally:
        subprocess.run([REMEDIATOR, "revert", "--all", "--config", str(CONFIG)], capture_output=True, timeout=120)
        hog.kill()
        hog.wait(timeout=30)
        subprocess.run(["systemctl", "stop", SCOPE], capture_output=True, timeout=60)
        wait_for(lambda: not FOREIGN.exists() or not (FOREIGN / "cgroup.procs").read_text().split(), 10, "guest-foreign empty")
        FOREIGN.rmdir()
        JOURNAL.unlink(missing_ok=True)
        if saved is not None:
            write_root_file(CONFIG, saved)


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
    crashed = subprocess.run([sys.executable, "-c", f"""
import os, sys
sys.path.insert(0, "/opt/remediator/tests")
from helpers.remediation import make_executor
from remediator.model import ActionRequest
from remediator.procfs import ProcFS
executor = make_executor(__import__("pathlib").Path("{JOURNAL}"))
request = ActionRequest(ProcFS().identity({foreign}), "cpu", "guest-foreign", 0, {{"cpu": {{"idle": 1}}, "group": "guest-foreign"}})
print(executor.apply(request, ()).status, flush=True)
os.kill(os.getpid(), {int(signal.SIGKILL)})
"""], capture_output=True, text=True, timeout=120, cwd="/opt/remediator")
    assert crashed.stdout.strip() == "applied", crashed.stdout + crashed.stderr
    assert cgroup_of(foreign) == SCOPE_CGROUP

    out = subprocess.run([REMEDIATOR, "revert", "--all", "--config", str(CONFIG)], capture_output=True, text=True, timeout=120)
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
