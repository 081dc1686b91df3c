"""The guest is the kind of host remediator is for: systemd as PID 1 and the unified cgroup v2
hierarchy, a distribution kernel with its own headers, the checkout installed as the README says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from remediator.hostcheck import bpf_problem, kernel_headers_description
from units import WORKLOADS


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


def test_the_kernel_tells_of_a_rename_and_a_move_to_another_cgroup():
    """Task events on this kernel's own tracepoint formats, on cgroup v2: a process renaming itself
    (prctl) and one moved to another cgroup without an exec (one probe load: ~30 s under TCG)."""
    from remediator.probes import SchedProbes

    probes = SchedProbes()
    cgroup = Path("/sys/fs/cgroup") / f"remediator-guest-test-{os.getpid()}"
    renamer = subprocess.Popen([sys.executable, str(WORKLOADS / "renamer.py")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert probes.has_task_events, probes.cflags
        assert renamer.stdout.readline().strip() == "ready"
        probes.snapshot()
        probes.task_changes()
        renamer.stdin.write("name renamed-svc\n")
        renamer.stdin.flush()
        assert renamer.stdout.readline().strip() == "ok"
        probes.snapshot()
        renamed, _moved = probes.task_changes()
        assert renamer.pid in renamed
        cgroup.mkdir()
        (cgroup / "cgroup.procs").write_text(str(renamer.pid))
        probes.snapshot()
        _renamed, moved = probes.task_changes()
        assert renamer.pid in moved
    finally:
        renamer.kill()
        renamer.wait()
        if cgroup.exists():
            cgroup.rmdir()  # empty once the process is reaped
        probes.close()
