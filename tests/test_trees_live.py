"""Process trees on real processes: a `vector` parent that idles while the `xz` and `gzip`
children it forked burn the victim's CPU. The daemon judges the tree rolled up to `vector` and
changes the children, never the idle parent nor the victim."""

from __future__ import annotations

import os
import sys

import pytest

from helpers.daemon import thread_settings, wait_until, write_config
from helpers.workloads import WORKLOADS, victim_argv

pytestmark = pytest.mark.bpf

TREE_POLICY = """
[[policy]]
name = "tree-shipper"
description = "vector and the compressors it forks"
[policy.match]
comm = ["vector"]
descendants = true
[policy.trigger]
tail = { percentile = 99.9, above = "1ms", windows = 2, of = 4 }
offender = { cpu = 0.5, blame_share = 0.3, require = "any" }
[[policy.actions]]
affinity = "unprotected"     # works across sessions and cgroups, where nice cannot
settle = "30s"
[policy.limits]
revert_after_quiet = "never"
"""


def cpus(pid: int) -> set[frozenset[int]]:
    return {allowed for _, allowed in thread_settings(pid).values()}


def test_the_children_of_a_matched_shipper_are_acted_on(spawn, daemon, tmp_path):
    if os.sched_getaffinity(0) != {0, 1}:
        pytest.skip("the scene needs CPUs 0 and 1")
    victim = spawn(victim_argv(0, "--work-us", "1000"))
    tree = spawn([sys.executable, str(WORKLOADS / "shipper_tree.py"), "--children", "2", "--cpu", "0"])
    with open(f"/proc/{tree.pid}/task/{tree.pid}/children") as listing:
        children = [int(pid) for pid in listing.read().split()]
    assert len(children) == 2
    run = daemon(write_config(tmp_path, [victim.pid], policy_text=TREE_POLICY))

    wait_until(lambda: all(cpus(pid) == {frozenset({1})} for pid in children), 10.0, what="both compressors off CPU 0")
    # The audit line follows the change: wait for it too.
    wait_until(lambda: {r["process"]["pid"] for r in run.audit() if r["decision"] == "act"} >= set(children), 5.0,
               what="both changes in the audit")
    acts = [r for r in run.audit() if r["decision"] == "act"]
    assert {r["process"]["pid"] for r in acts} == set(children)
    assert {r["process"]["comm"] for r in acts} == {"xz", "gzip"}
    for record in acts:
        print(record["process"]["comm"], record["evidence"]["offender"], record["evidence"]["tree"])
        assert record["evidence"]["tree"]["root"]["pid"] == tree.pid
        assert record["evidence"]["tree"]["root"]["comm"] == "vector"
        assert "descendant of vector" in record["evidence"]["match"]
        assert record["outcome"] == "applied"
    assert cpus(tree.pid) == {frozenset({0, 1})}  # the idle parent is untouched (and the victim: no act on it above)
    assert run.stop() == 0
    assert all(cpus(pid) == {frozenset({0})} for pid in children)  # given back on exit (they pinned themselves to CPU 0)
