"""Test harness: markers for root and BPF, and process/cgroup cleanup helpers.

Tests marked `root` or `bpf` skip, saying why, where this host cannot run them. In CI
(`REMEDIATOR_REQUIRE_PRIVILEGED=1`, set by .ci/run) such a skip is a failure: the kernel path
must really have been exercised.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.privileges import bpf_unavailable_reason, root_unavailable_reason  # noqa: E402

REQUIRE_PRIVILEGED = os.environ.get("REMEDIATOR_REQUIRE_PRIVILEGED") == "1"

# tests/guest runs inside the guest VMs (systemd, cgroup v2: `./bootstrap vm test`), and tests/vm
# is the harness that boots them; neither belongs to a run on this host.
collect_ignore = ["vm"] if os.environ.get("REMEDIATOR_GUEST") else ["vm", "guest"]


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_PRIVILEGED:
        pytest.fail(f"privileged test could not run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") or item.get_closest_marker("bpf"):
        reason = root_unavailable_reason()
        if reason:
            _skip_or_fail(reason)
    if item.get_closest_marker("bpf"):
        reason = bpf_unavailable_reason()
        if reason:
            _skip_or_fail(reason)


from helpers.workloads import spawn  # noqa: E402,F401  (fixture)
from helpers.daemon import daemon  # noqa: E402,F401  (fixture)


# Where remediator makes groups on this host: the v1 cpuset and cpu hierarchies (cpuset steps;
# cpu_idle, cpu_weight and cpu_quota steps), and the unified one.
CGROUP_GLOBS = ("/sys/fs/cgroup/cpuset/remediator*", "/sys/fs/cgroup/cpu/remediator*", "/sys/fs/cgroup/unified/remediator*",
                "/sys/fs/cgroup/remediator*")


def _remediator_cgroups() -> set[str]:
    import glob

    return {path for pattern in CGROUP_GLOBS for path in glob.glob(pattern)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._cgroups_before = _remediator_cgroups()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test that leaves a remediator cgroup behind fails the run (and the cgroup is removed)."""
    left = sorted(_remediator_cgroups() - getattr(session.config, "_cgroups_before", set()))
    if not left:
        return
    for path in reversed(left):  # children before parents
        try:
            os.rmdir(path)
        except OSError:
            pass
    print(f"\nerror: tests left cgroups behind: {', '.join(left)}", file=sys.stderr)
    session.exitstatus = 1


@pytest.fixture(autouse=True)
def _test_process_keeps_its_cpus():
    """A daemon run inside the test process moves itself off the request CPUs (as it should on a
    host): give the test process its CPUs back, so a later test is not run on fewer."""
    before = os.sched_getaffinity(0)
    yield
    if os.sched_getaffinity(0) != before:
        os.sched_setaffinity(0, before)
