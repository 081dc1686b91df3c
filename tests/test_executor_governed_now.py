"""The executor changes a process only while the policy that asked still governs it as read at
that moment: the engine decides on readings cached for seconds, and in between a process can exec
into another program, rename itself, or leave the tree a tree policy covers. Real processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers.remediation import identity_of, new_executor, nice_request, thread_nices  # noqa: F401
from remediator.model import ActionRequest
from remediator.policy import load_policies

pytestmark = pytest.mark.root

POLICIES = """
[[policy]]
name = "log-shippers"
description = "what nice_request asks for"
[policy.match]
comm = ["shipper-a"]
[policy.trigger]
always = true
[[policy.actions]]
nice = 10

[[policy]]
name = "backup-tree"
description = "a tree policy: the agent and whatever it forks"
[policy.match]
comm = ["backup-agent"]
descendants = true
[policy.trigger]
always = true
[[policy.actions]]
nice = 10
"""


@pytest.fixture
def policies(tmp_path: Path):
    path = tmp_path / "policies.toml"
    path.write_text(POLICIES)
    return load_policies([path])


# Names itself argv[1] (PR_SET_NAME), and argv[2] on SIGUSR1; with argv[3] == "fork", a child sleeps under it.
RENAMING = """
import ctypes, signal, subprocess, sys, time
libc = ctypes.CDLL(None)
def name(text):
    libc.prctl(15, text.encode(), 0, 0, 0)
name(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *_: name(sys.argv[2]))
if sys.argv[3:] == ["fork"]:
    subprocess.Popen(["sleep", "600"])
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def named(spawn, comm: str, later: str = "payments-api", *extra: str):
    """A sleeping process named `comm` that renames itself `later` on rename()."""
    return spawn([sys.executable, "-c", RENAMING, comm, later, *extra])


def rename(process, later: str = "payments-api") -> None:
    os.kill(process.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{process.pid}/comm").read_text().strip() != later:
        assert time.monotonic() < deadline, "the process did not rename itself"
        time.sleep(0.01)


def test_a_process_still_named_is_changed(spawn, new_executor, policies):
    process = named(spawn, "shipper-a")
    outcome = new_executor().apply(nice_request(process.pid, 10), (), policies)
    assert outcome.status == "applied", outcome
    assert set(thread_nices(process.pid).values()) == {10}


def test_a_process_renamed_since_the_decision_is_refused_and_left_alone(spawn, new_executor, policies):
    process = named(spawn, "shipper-a")
    request = nice_request(process.pid, 10)  # decided while it was shipper-a
    rename(process)
    executor = new_executor()
    outcome = executor.apply(request, (), policies)
    assert outcome.status == "refused", outcome
    assert outcome.message == (f"pid {process.pid} (payments-api) as read now is not policy log-shippers's to change "
                               "(no policy names it): nothing changed")
    assert set(thread_nices(process.pid).values()) == {0}
    assert executor.journal.entries() == []  # refused before any intent was written


def test_a_process_another_policy_governs_now_is_refused(spawn, new_executor, policies):
    process = named(spawn, "backup-agent")
    outcome = new_executor().apply(nice_request(process.pid, 10), (), policies)  # log-shippers asks
    assert outcome.status == "refused"
    assert "(policy backup-tree governs it)" in outcome.message
    assert set(thread_nices(process.pid).values()) == {0}


def test_a_child_is_governed_through_its_parent_read_now(spawn, new_executor, policies):
    """A tree policy's child is judged on its parent chain as /proc has it at the change."""
    agent = named(spawn, "backup-agent", "sh", "fork")
    child = int(Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()[0])
    request = ActionRequest(identity_of(child), "nice", "backup-tree", 0, {"nice": 10})
    executor = new_executor()
    assert executor.apply(request, (), policies).status == "applied"
    assert set(thread_nices(child).values()) == {10}

    rename(agent, "sh")  # its parent is no longer the agent the policy names
    other = executor.apply(ActionRequest(identity_of(child), "nice", "backup-tree", 1, {"nice": 15}), (), policies)
    assert other.status == "refused" and "(no policy names it)" in other.message
    assert set(thread_nices(child).values()) == {10}


def test_without_policies_the_executor_does_not_judge(spawn, new_executor):
    """Its own callers (revert tools, tests) pass none; the daemon always does (tick.ExecutorCarrier)."""
    process = named(spawn, "payments-api")
    assert new_executor().apply(nice_request(process.pid, 10), ()).status == "applied"
