"""Real cgroup v1 cpuset and cpu helpers for root tests: scratch cgroups, and a guard that none is left behind."""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

import pytest

from remediator.cgroupfs import discover_cpu_mount, discover_cpuset_mount

CPUSET_V1 = Path("/sys/fs/cgroup/cpuset")


def cpuset_v1_root() -> Path:
    """The v1 cpuset mount, or skip (this host must have one for the real-kernel cpuset tests)."""
    mount = discover_cpuset_mount()
    if mount is None or mount.version != 1:
        pytest.skip("no cgroup v1 cpuset hierarchy mounted here")
    return mount.mount_point


def remediator_cgroups(root: Path) -> set[Path]:
    return {path for path in root.glob("remediator*") if path.is_dir()}


def evacuate_and_remove(directory: Path, root: Path) -> None:
    """Move any process back to the root cpuset and remove the cgroup (children first)."""
    nested = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for cgroup in [*nested, directory]:
        _evacuate_one(cgroup, root)


def _evacuate_one(directory: Path, root: Path) -> None:
    for _ in range(50):
        if not directory.exists():
            return
        for pid in (directory / "cgroup.procs").read_text().split():
            try:
                move_to(root, int(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.05)  # an exiting task may linger for a moment
    os.rmdir(directory)


@pytest.fixture
def no_leftover_cgroups():
    """Fail the test if it leaves a remediator* cpuset cgroup behind; remove it either way."""
    root = cpuset_v1_root()
    before = remediator_cgroups(root)
    yield root
    leftovers = remediator_cgroups(root) - before
    for directory in leftovers:
        evacuate_and_remove(directory, root)
    if leftovers:
        pytest.fail(f"cgroups left behind: {', '.join(sorted(str(d) for d in leftovers))}", pytrace=False)


@pytest.fixture
def scratch_cpuset():
    """make(cpus) -> a fresh v1 cpuset cgroup (a stand-in for a service's own cgroup), removed at teardown."""
    root = cpuset_v1_root()
    made: list[Path] = []

    def make(cpus: str, mems: str | None = None) -> Path:
        directory = root / f"test-scratch-{uuid.uuid4().hex[:8]}"
        os.mkdir(directory)
        made.append(directory)
        (directory / "cpuset.cpus").write_text(cpus)
        (directory / "cpuset.mems").write_text(mems if mems is not None else (root / "cpuset.mems").read_text().strip())
        return directory

    yield make
    for directory in made:
        if directory.exists():
            evacuate_and_remove(directory, root)


def move_to(directory: Path, pid: int) -> None:
    fd = os.open(directory / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def cgroup_path_of(pid: int, controller: str) -> str:
    """The process's path in the v1 hierarchy of `controller`, from /proc/PID/cgroup."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise LookupError(f"pid {pid} has no {controller} line")


def cpuset_path_of(pid: int) -> str:
    return cgroup_path_of(pid, "cpuset")


@pytest.fixture
def scratch_cpu_cgroup():
    """make(quota_us, period_us) -> a fresh v1 cpu cgroup with a CFS quota (a service's own
    cpu.cfs_quota_us), removed at teardown with its processes moved back to the root."""
    mount = discover_cpu_mount()
    if mount is None or mount.version != 1:
        pytest.skip("no cgroup v1 cpu hierarchy mounted here")
    root = mount.mount_point
    made: list[Path] = []

    def make(quota_us: int, period_us: int = 100_000) -> Path:
        directory = root / f"test-scratch-{uuid.uuid4().hex[:8]}"
        os.mkdir(directory)
        made.append(directory)
        (directory / "cpu.cfs_period_us").write_text(str(period_us))
        (directory / "cpu.cfs_quota_us").write_text(str(quota_us))
        return directory

    yield make
    for directory in made:
        if directory.exists():
            evacuate_and_remove(directory, root)
