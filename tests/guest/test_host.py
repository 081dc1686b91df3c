"""The guest is the kind of host remediator is for: systemd as PID 1 and the unified cgroup v2
hierarchy, a distribution kernel with its own headers, the checkout installed as the README says."""

from __future__ import annotations

import os
from pathlib import Path

from remediator.hostcheck import bpf_problem, kernel_headers_description


def test_systemd_is_pid_1():
    assert Path("/proc/1/comm").read_text().strip() == "systemd"


def test_cgroup_v2_only():
    assert Path("/sys/fs/cgroup/cgroup.controllers").exists(), "no unified hierarchy at /sys/fs/cgroup"
    controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert {"cpu", "cpuset"} <= set(controllers), controllers
    assert not Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists(), "a v1 cpuset hierarchy is mounted"


def test_the_probes_can_load_with_the_kernels_own_headers():
    assert bpf_problem() is None, bpf_problem()
    description = kernel_headers_description()
    assert "fallback" not in description, description
    assert os.uname().release in description, description


def test_installed_as_the_readme_says():
    assert Path("/opt/remediator/.venv/bin/remediator").exists()
    assert Path("/etc/systemd/system/remediator.service").exists()
    assert Path("/etc/remediator/remediator.toml").exists()
    assert int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) <= 2, "the README's sysctl line did not apply"
