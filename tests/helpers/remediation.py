"""Building executors for tests and reading back what the kernel says about a process's threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remediator.actuators import Syscalls, default_actuators
from remediator.executor import Executor
from remediator.model import ActionRequest
from remediator.journal import Journal
from remediator.procfs import ProcessIdentity, ProcFS

# The tests start the hogs themselves, so by default safety.exclusion_reason would refuse them as
# "a child of remediator". Pretending remediator runs as no real pid keeps every other rule in force.
NOT_OUR_PID = 0


def make_executor(journal_path: Path | None, *, syscalls: Syscalls | None = None, dry_run: bool = False,
                  procfs: ProcFS | None = None, self_pid: int = NOT_OUR_PID, **actuator_options) -> Executor:
    procfs = procfs or ProcFS()
    journal = Journal(journal_path) if journal_path is not None else None
    actuators = default_actuators(procfs, syscalls=syscalls, **actuator_options)
    return Executor(journal, procfs, dry_run=dry_run, actuators=actuators, self_pid=self_pid)


def identity_of(pid: int) -> ProcessIdentity:
    return ProcFS().identity(pid)


def nice_request(pid: int, value: int, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "nice", "log-shippers", step, {"nice": value}, evidence={"test": True})


def affinity_request(pid: int, cpus, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "affinity", "log-shippers", step, {"cpus": sorted(cpus)})


def cpuset_request(pid: int, cpus, name: str, step: int = 0) -> ActionRequest:
    return ActionRequest(identity_of(pid), "cpuset", name, step, {"cgroup": name, "cpus": sorted(cpus)})


def tids_of(pid: int) -> list[int]:
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))


def thread_nices(pid: int) -> dict[int, int]:
    return {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids_of(pid)}


def thread_masks(pid: int) -> dict[int, frozenset[int]]:
    return {tid: frozenset(os.sched_getaffinity(tid)) for tid in tids_of(pid)}


def close(executor: Executor) -> None:
    if executor.journal is not None:
        executor.journal.close()


@pytest.fixture
def new_executor(tmp_path):
    """new_executor(**options) -> Executor journalling to tmp_path/journal.jsonl; journals closed at teardown."""
    made: list[Executor] = []

    def build(journal_path: Path | None | str = "default", **options) -> Executor:
        path = tmp_path / "journal.jsonl" if journal_path == "default" else journal_path
        executor = make_executor(path, **options)
        made.append(executor)
        return executor

    yield build
    for executor in made:
        close(executor)
