"""Own-quota throttling on the real kernel: a victim in a test-owned v1 cpu cgroup with a CFS quota
far below its demand, and a `fluent-bit` burning the other CPU. The victim's tail is awful, the
shipper meets a CPU-only trigger, and yet the daemon must not act: the tail is self-inflicted."""

from __future__ import annotations

import os
import time

import pytest

from helpers.cgroups import move_to, scratch_cpu_cgroup  # noqa: F401  (fixture)
from helpers.daemon import thread_settings, wait_until, write_config
from helpers.workloads import hog_argv, pin_workers, victim_argv

pytestmark = pytest.mark.bpf

CPU_ONLY_POLICY = """
[[policy]]
name = "cpu-only"
description = "a shipper judged on its CPU alone, so only the self-inflicted rule can stop the step"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { percentile = 99.0, above = "1ms", windows = 2, of = 4 }
offender = { cpu = 0.5 }
[[policy.actions]]
nice = 10
settle = "1s"
"""


def test_a_service_throttled_by_its_own_quota_is_not_defended_against_a_neighbour(spawn, daemon, tmp_path, scratch_cpu_cgroup):
    if os.sched_getaffinity(0) != {0, 1}:
        pytest.skip("the scene needs CPUs 0 and 1")
    own = scratch_cpu_cgroup(quota_us=5_000, period_us=50_000)  # 10% of a CPU; the victim wants half of one
    victim = spawn(victim_argv(0, "--work-us", "1000"))
    move_to(own, victim.pid)
    hog = spawn(hog_argv("fluent-bit", 1))
    pin_workers(hog, (1,))  # on the other CPU: it delays nobody
    run = daemon(write_config(tmp_path, [victim.pid], policy_text=CPU_ONLY_POLICY))

    skipped = wait_until(lambda: [r for r in run.audit() if r["decision"] == "skipped"], 10.0, what="a self-inflicted skip")
    time.sleep(3.0)  # several more ticks with the trigger holding: still no step
    records = run.audit()
    assert [r for r in records if r["decision"] == "act"] == []
    assert {nice for nice, _ in thread_settings(hog.pid).values()} == {0}
    evidence = skipped[0]["evidence"]
    print(skipped[0]["message"], evidence["protected_throttling"], evidence["offender"])
    assert evidence["skipped"] == "self-inflicted" and skipped[0]["process"]["pid"] == hog.pid
    assert evidence["protected_throttling"]["throttled_ns"] > evidence["protected_throttling"]["behind_others_ns"]
    assert evidence["offender"]["cpu"] >= 0.5  # the trigger held: only the self-inflicted rule held the step back
    assert run.stop() == 0
