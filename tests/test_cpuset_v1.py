"""The cpuset actuator on this host's real cgroup v1 cpuset hierarchy (as root).

Every test runs under `no_leftover_cgroups`: a remediator* cgroup left behind fails the test (and
is removed anyway).
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest

from helpers.cgroups import cpuset_path_of, move_to, no_leftover_cgroups, scratch_cpuset  # noqa: F401  (fixtures)
from helpers.faults import FaultySyscalls
from helpers.remediation import cpuset_request, new_executor, thread_masks  # noqa: F401  (fixture)
from helpers.workloads import hog_argv
from remediator.cgroupfs import CgroupFS

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("no_leftover_cgroups")]


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def thread_cpuset_paths(pid: int) -> set[str]:
    paths = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpuset" in controllers.split(","):
                paths.add(path)
    return paths


def test_process_and_all_its_threads_move_in_and_back_and_the_cgroup_goes(spawn, new_executor, no_leftover_cgroups):
    root = no_leftover_cgroups
    hog = spawn(hog_argv(threads=2))
    name = unique_name()
    cgroup = root / f"remediator-{name}"
    executor = new_executor()

    outcome = executor.apply(cpuset_request(hog.pid, {1}, name), ())

    assert outcome.status == "applied", outcome
    assert outcome.message == (
        f'mkdir {cgroup}; write "1" to .../cpuset.cpus; write "0" to .../cpuset.mems; '
        f'write "{hog.pid}" to .../cgroup.procs (was /)'
    )
    assert (cgroup / "cpuset.cpus").read_text().strip() == "1"
    assert (cgroup / "cpuset.mems").read_text().strip() == (root / "cpuset.mems").read_text().strip()
    assert thread_cpuset_paths(hog.pid) == {f"/remediator-{name}"}  # every thread followed
    assert set(thread_masks(hog.pid).values()) == {frozenset({1})}  # and the kernel confines them

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert restored.message == f'write "{hog.pid}" to {root}/cgroup.procs (was /remediator-{name}); rmdir {cgroup}'
    assert thread_cpuset_paths(hog.pid) == {"/"}
    assert not cgroup.exists()
    assert set(thread_masks(hog.pid).values()) == {frozenset({0, 1})}


def test_restore_returns_the_process_to_its_own_cgroup_and_each_thread_its_mask(spawn, new_executor, scratch_cpuset):
    hog = spawn(hog_argv(threads=2))
    home = scratch_cpuset("0-1")  # the service's own cpuset, not the root
    move_to(home, hog.pid)
    worker = hog.tids()[1]
    os.sched_setaffinity(worker, {0})
    before = thread_masks(hog.pid)
    executor = new_executor()
    name = unique_name()

    assert executor.apply(cpuset_request(hog.pid, {1}, name), ()).status == "applied"
    assert cpuset_path_of(hog.pid) == f"/remediator-{name}"
    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert cpuset_path_of(hog.pid) == f"/{home.name}"
    assert thread_masks(hog.pid) == before


def test_a_shared_cgroup_stays_until_its_last_process_is_restored(spawn, new_executor, no_leftover_cgroups):
    first, second = spawn(hog_argv(threads=1)), spawn(hog_argv(threads=1))
    name = unique_name()
    cgroup = no_leftover_cgroups / f"remediator-{name}"
    executor = new_executor()
    assert executor.apply(cpuset_request(first.pid, {1}, name), ()).status == "applied"
    joined = executor.apply(cpuset_request(second.pid, {1}, name), ())
    assert joined.message == f'write "{second.pid}" to {cgroup}/cgroup.procs (was /)'  # no mkdir, no rewrite

    [one] = executor.restore_pid(first.pid)
    assert one.status == "restored" and one.message.endswith(f"{cgroup} kept (1 other process in it)")
    assert cgroup.exists()
    [two] = executor.restore_pid(second.pid)
    assert two.message.endswith(f"rmdir {cgroup}")
    assert not cgroup.exists()


def test_a_process_that_exits_in_the_cgroup_is_dropped_and_the_cgroup_removed(spawn, new_executor, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=1))
    name = unique_name()
    cgroup = no_leftover_cgroups / f"remediator-{name}"
    executor = new_executor()
    assert executor.apply(cpuset_request(hog.pid, {1}, name), ()).status == "applied"
    hog.kill()

    [dropped] = executor.maintain()

    assert dropped.status == "dropped"
    assert f"pid {hog.pid}" in dropped.message and f"rmdir {cgroup}" in dropped.message
    assert not cgroup.exists()
    assert executor.active() == []


def test_original_cgroup_removed_meanwhile_is_reported_and_the_process_left_alone(spawn, new_executor, scratch_cpuset, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=1))
    home = scratch_cpuset("0-1")
    move_to(home, hog.pid)
    name = unique_name()
    executor = new_executor()
    assert executor.apply(cpuset_request(hog.pid, {1}, name), ()).status == "applied"
    os.rmdir(home)  # the service's cgroup went away (unit stopped and restarted elsewhere, say)

    [outcome] = executor.restore()

    assert outcome.status == "failed"
    assert outcome.message == f"original cgroup /{home.name} no longer exists under {no_leftover_cgroups}: pid {hog.pid} stays in /remediator-{name}"
    assert cpuset_path_of(hog.pid) == f"/remediator-{name}"
    assert executor.active() == []  # retrying can never succeed: closed, with the reason in the journal
    # Leaving the cgroup was right here; the test cleans it up itself, so the leftover guard stays strict.
    move_to(no_leftover_cgroups, hog.pid)
    os.rmdir(no_leftover_cgroups / f"remediator-{name}")


def test_cpus_outside_the_parent_are_invalid_and_nothing_is_created(spawn, new_executor, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=1))
    name = unique_name()
    outcome = new_executor().apply(cpuset_request(hog.pid, {7}, name), ())
    assert outcome.status == "invalid"
    assert "requested CPUs 7 are all outside what cpuset parent / allows (0-1)" in outcome.message
    assert not (no_leftover_cgroups / f"remediator-{name}").exists()
    assert cpuset_path_of(hog.pid) == "/"


class FailingCgroupFS(CgroupFS):
    """The real cgroupfs, with one write refused."""

    def __init__(self, name: str, code: int):
        self.name, self.code = name, code

    def write(self, path, value):
        if Path(path).name == self.name:
            raise OSError(self.code, os.strerror(self.code), str(path))
        super().write(path, value)


def test_a_failed_move_removes_the_cgroup_it_just_created(spawn, new_executor, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=1))
    name = unique_name()
    executor = new_executor(cgroupfs=FailingCgroupFS("cgroup.procs", errno.EACCES))
    outcome = executor.apply(cpuset_request(hog.pid, {1}, name), ())
    assert outcome.status == "denied"
    assert outcome.message.startswith(f'write "{hog.pid}" to {no_leftover_cgroups}/remediator-{name}/cgroup.procs failed with EACCES')
    assert outcome.message.endswith(f"removed {no_leftover_cgroups}/remediator-{name}")
    assert not (no_leftover_cgroups / f"remediator-{name}").exists()
    assert executor.active() == []


def test_cpuset_restore_puts_back_masks_a_kernel_reset(spawn, new_executor):
    # Kernels before 6.2 reset thread masks to the cpuset's CPUs when a task changes cpuset; this
    # one keeps them, so the reset is simulated on the way back.
    hog = spawn(hog_argv(threads=2))
    worker = hog.tids()[1]
    os.sched_setaffinity(worker, {0})
    before = thread_masks(hog.pid)
    syscalls = FaultySyscalls()
    executor = new_executor(syscalls=syscalls)
    name = unique_name()
    assert executor.apply(cpuset_request(hog.pid, {1}, name), ()).status == "applied"
    for tid in hog.tids():
        os.sched_setaffinity(tid, {0, 1})  # after the move back, every thread would run on 0-1, as on an old kernel
    [restored] = executor.restore()
    assert restored.status == "restored"
    assert "sched_setaffinity back to the original mask on 1 thread" in restored.message
    assert thread_masks(hog.pid) == before


def test_a_later_step_into_another_cgroup_keeps_the_first_original_and_removes_the_emptied_cgroup(spawn, new_executor, no_leftover_cgroups):
    hog = spawn(hog_argv(threads=1))
    first, second = unique_name(), unique_name()
    executor = new_executor()
    # Both on CPU 1: a first step of 0-1 would be no step at all (the root cpuset already allows no more).
    assert executor.apply(cpuset_request(hog.pid, {1}, first), ()).status == "applied"
    moved = executor.apply(cpuset_request(hog.pid, {1}, second, step=1), ())
    assert moved.status == "applied", moved
    assert moved.message.endswith(f"(was /remediator-{first}); rmdir {no_leftover_cgroups}/remediator-{first}")
    assert not (no_leftover_cgroups / f"remediator-{first}").exists()
    [entry] = executor.active()
    assert entry.original["cgroup"] == "/" and entry.applied["cgroup"] == f"/remediator-{second}"
    [restored] = executor.restore()
    assert restored.status == "restored" and cpuset_path_of(hog.pid) == "/"


def test_a_process_whose_cpuset_is_already_within_the_step_is_not_moved(spawn, new_executor, scratch_cpuset, no_leftover_cgroups):
    # Never wider: a backup already confined to CPU 1 by its own cpuset is not moved into one of 0-1.
    hog = spawn(hog_argv(threads=1))
    own = scratch_cpuset("1")
    move_to(own, hog.pid)
    executor = new_executor()
    name = unique_name()
    outcome = executor.apply(cpuset_request(hog.pid, {0, 1}, name), ())
    assert outcome.status == "unchanged", outcome
    assert outcome.message == f"pid {hog.pid} is in /{own.name}, whose cpuset (/{own.name}) allows 1, already within 0-1: not moved"
    assert cpuset_path_of(hog.pid) == f"/{own.name}"
    assert not (no_leftover_cgroups / f"remediator-{name}").exists()
    assert executor.active() == []
