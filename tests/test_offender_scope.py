"""Which offenders may move into remediator's own transient scope on a systemd + cgroup v2 host
(actuators/scope.py), on a fake cgroup v2 tree: a process in no unit may, one inside a unit or a
user's own manager may not, and never one whose cgroup (or an ancestor) holds limits it would
escape. The move itself, the revert and the scope's removal run for real in the guests
(tests/guest/test_scope.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.actuators.base import ChangeInvalid
from remediator.actuators.scope import OffenderScopes, outside_units
from remediator.cgroupfs import CgroupFS, CgroupMount

DEFAULTS = {"memory.max": "max", "memory.high": "max", "pids.max": "max", "cpu.max": "max 100000", "io.max": "", "cpuset.cpus": ""}


def make_group(root: Path, path: str, **values: str) -> None:
    directory = root / path.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in {**DEFAULTS, **{key.replace("_", "."): value for key, value in values.items()}}.items():
        (directory / name).write_text(value + "\n")


@pytest.fixture
def scopes(tmp_path):
    mount = CgroupMount(2, tmp_path, "/", frozenset({"cpu", "cpuset", "memory", "pids"}))
    return OffenderScopes(systemd=None, mount=mount, cgroupfs=CgroupFS())


@pytest.mark.parametrize("path, movable", [
    ("/guest-foreign", True),
    ("/", True),
    ("/docker/0123abcd", True),
    ("/system.slice/fluent-bit.service", False),
    ("/system.slice/docker-0123.scope", False),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service", False),
    ("/user.slice/user-1000.slice/user@1000.service/custom", False),
    ("/system.slice", False),
])
def test_only_a_process_in_no_system_unit_may_move(path, movable):
    assert outside_units(path)[0] is movable


def test_a_group_without_limits_is_movable(scopes, tmp_path):
    make_group(tmp_path, "/foreign")
    make_group(tmp_path, "/foreign/worker")
    scopes.check_movable(42, "/foreign/worker")


@pytest.mark.parametrize("limit", ["memory_max", "memory_high", "pids_max", "cpu_max", "io_max", "cpuset_cpus"])
def test_a_limit_on_the_group_or_an_ancestor_refuses_the_move(scopes, tmp_path, limit):
    value = {"memory_max": "1073741824", "memory_high": "536870912", "pids_max": "100", "cpu_max": "50000 100000",
             "io_max": "8:0 rbps=1048576", "cpuset_cpus": "1"}[limit]
    make_group(tmp_path, "/foreign", **{limit: value})
    make_group(tmp_path, "/foreign/worker")
    with pytest.raises(ChangeInvalid) as refused:
        scopes.check_movable(42, "/foreign/worker")
    assert limit.replace("_", ".") in refused.value.message and value in refused.value.message
    assert refused.value.message.endswith("nothing changed")
