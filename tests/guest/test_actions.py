"""The cpu and sched steps on a systemd + cgroup v2 host: a unit's runtime CPUWeight (idle included)
and CPUQuota through systemd, seen in the unit's own cgroup files, every property given back
exactly, after a crash too; SCHED_IDLE on every thread of a unit's process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers.remediation import close, identity_of, make_executor
from remediator.model import ActionRequest
from units import (ACTION_CONFIG_TEXT, CONFIG, JOURNAL, WORKLOADS, cpu_step_then_sigkill, install_unit, main_pid, remove_unit, revert_all, show,
                   systemctl, wait_for, write_root_file)

pytestmark = pytest.mark.root

UNIT = "sidecar.service"
UNIT_TEXT = f"""[Unit]
Description=a sidecar compressing flat out
[Service]
ExecStart=/usr/bin/python3 {WORKLOADS}/hog.py --comm sidecar --threads 2
"""
CGROUP = Path("/sys/fs/cgroup/system.slice") / UNIT
DROPINS = Path("/run/systemd/system.control") / f"{UNIT}.d"
PROPERTIES = ("CPUWeight", "CPUQuotaPerSecUSec", "CPUQuotaPeriodUSec")


@pytest.fixture
def sidecar():
    saved = CONFIG.read_text() if CONFIG.exists() else None
    write_root_file(CONFIG, ACTION_CONFIG_TEXT)
    install_unit(UNIT, UNIT_TEXT)
    systemctl("start", UNIT)
    try:
        yield main_pid(UNIT)
    finally:
        revert_all()
        remove_unit(UNIT)
        subprocess.run(["systemctl", "revert", UNIT], capture_output=True, timeout=60)
        JOURNAL.unlink(missing_ok=True)
        if saved is not None:
            write_root_file(CONFIG, saved)


def cpu_request(pid: int, setting: tuple, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "cpu", "guest-sidecar", step, {"cpu": dict(setting), "group": "guest-sidecar"})


# What a cpu file reads where systemd has not enabled the controller for the unit (no file at all).
CPU_DEFAULTS = {"cpu.weight": "100", "cpu.idle": "0", "cpu.max": "max 100000"}


def cgroup_file(name: str) -> str:
    try:
        return (CGROUP / name).read_text().strip()
    except FileNotFoundError:
        return CPU_DEFAULTS[name]


@pytest.fixture
def executor():
    made = make_executor(JOURNAL)
    yield made
    close(made)  # the journal's lock goes with it


def test_cpu_weight_idle_and_max_go_through_systemd_and_come_back_exactly(sidecar, executor):
    before = show(UNIT, *PROPERTIES)
    files_before = {name: cgroup_file(name) for name in CPU_DEFAULTS}

    weight = executor.apply(cpu_request(sidecar, (("weight", 10),)), ())
    print(weight.message)
    assert weight.status == "applied", weight
    assert weight.message.startswith(f"systemd SetUnitProperties {UNIT} --runtime CPUWeight=10 (was CPUWeight=[not set])")
    assert show(UNIT, "CPUWeight")["CPUWeight"] == "10"
    wait_for(lambda: cgroup_file("cpu.weight") == "10", 10, "cpu.weight 10 in the unit's cgroup")

    idle = executor.apply(cpu_request(sidecar, (("idle", 1),), step=1), ())
    print(idle.message)
    assert idle.status == "applied", idle
    wait_for(lambda: cgroup_file("cpu.idle") == "1", 10, "cpu.idle 1 in the unit's cgroup")
    assert executor.apply(cpu_request(sidecar, (("weight", 50),), step=2), ()).status == "unchanged"  # never a raise

    cap = executor.apply(cpu_request(sidecar, (("quota_us", 20_000), ("period_us", 100_000)), step=3), ())
    print(cap.message)
    assert cap.status == "applied", cap
    wait_for(lambda: cgroup_file("cpu.max") == "20000 100000", 10, "cpu.max 20000 100000 in the unit's cgroup")
    [entry] = executor.active()
    assert entry.original["properties"]["CPUWeight"] == 2**64 - 1  # from before the first step

    [restored] = executor.restore()
    print(restored.message)
    assert restored.status == "restored", restored
    assert show(UNIT, *PROPERTIES) == before
    wait_for(lambda: {name: cgroup_file(name) for name in files_before} == files_before, 10, "the unit's cgroup files as before")
    # Every 50-*.conf systemd wrote for our properties is gone again (it would override the unit file).
    assert not DROPINS.exists(), sorted(os.listdir(DROPINS))


def test_after_a_crash_revert_all_gives_the_unit_its_properties_back(sidecar):
    before = show(UNIT, *PROPERTIES)
    crashed = cpu_step_then_sigkill(sidecar, (("idle", 1),), "guest-sidecar")
    assert crashed.stdout.strip() == "applied", crashed.stdout + crashed.stderr
    assert show(UNIT, "CPUWeight")["CPUWeight"] == "idle"

    out = revert_all()
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert show(UNIT, *PROPERTIES) == before
    wait_for(lambda: cgroup_file("cpu.idle") == "0", 10, "cpu.idle 0 again")
    assert not DROPINS.exists(), sorted(os.listdir(DROPINS))


def test_a_unit_holding_a_protected_process_is_refused(sidecar, executor):
    outcome = executor.apply(cpu_request(sidecar, (("weight", 10),)), protected_pids=(sidecar,))
    assert outcome.status in ("refused", "excluded", "invalid"), outcome
    assert show(UNIT, "CPUWeight")["CPUWeight"] == "[not set]"


def test_sched_idle_on_every_thread_of_a_units_process_and_back(sidecar, executor):
    tids = sorted(int(tid) for tid in os.listdir(f"/proc/{sidecar}/task"))
    outcome = executor.apply(ActionRequest(identity_of(sidecar), "sched", "guest-sidecar", 0, {"sched": "idle"}), ())
    print(outcome.message)
    assert outcome.status == "applied", outcome
    assert {os.sched_getscheduler(tid) for tid in tids} == {os.SCHED_IDLE}
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert {os.sched_getscheduler(tid) for tid in tids} == {os.SCHED_OTHER}


def test_a_units_weight_is_given_back_when_the_process_it_was_set_for_exits(sidecar, executor):
    """The unit outlives the process the step was journaled under (a compressor a shipper forked
    and that finished): when it exits, the unit gets its CPUWeight back, and no drop-in is left."""
    before = show(UNIT, *PROPERTIES)
    assert executor.apply(cpu_request(sidecar, (("idle", 1),)), ()).status == "applied"
    assert show(UNIT, "CPUWeight")["CPUWeight"] == "idle"

    os.kill(sidecar, 9)  # no Restart=: the unit goes inactive, its runtime property stays
    wait_for(lambda: not Path(f"/proc/{sidecar}").exists(), 10, "the process gone")
    outcomes = executor.maintain()
    print("\n".join(outcome.message for outcome in outcomes))

    assert [outcome.status for outcome in outcomes] == ["dropped"], outcomes
    assert show(UNIT, *PROPERTIES) == before
    assert not DROPINS.exists() or not os.listdir(DROPINS), sorted(os.listdir(DROPINS))
    assert executor.active() == []
