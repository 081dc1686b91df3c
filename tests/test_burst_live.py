"""Burst detection on real processes: with `tail.within`, the probe's event makes the daemon act
off the tick. The tick is 10 s here, so an action before the first tick can only come from the
event path (a bound in ticks, not a latency assertion); bench/incident.py measures the latency.
"""

from __future__ import annotations

import os
import time

import pytest

from helpers.daemon import SHIPPER_POLICY, thread_settings, wait_until, write_config
from helpers.workloads import hog_argv, pin_workers, victim_argv

pytestmark = pytest.mark.bpf

ALL = frozenset({0, 1})
TICK_S = 10.0

BURST_POLICY = SHIPPER_POLICY.format(above="1ms", windows=2).replace(
    'windows = 2, of = 4 }', 'windows = 2, of = 4, within = "50ms", waits = 2 }')


@pytest.fixture(autouse=True)
def two_cpus():
    if os.sched_getaffinity(0) != ALL:
        pytest.skip("the scene needs exactly CPUs 0 and 1")
    os.sched_setaffinity(0, frozenset({1}))
    yield
    os.sched_setaffinity(0, ALL)


def long_tick_config(tmp_path, victim_pid: int, policy_text: str):
    config = write_config(tmp_path, [victim_pid], policy_text=policy_text)
    config.write_text(config.read_text().replace('tick = "250ms"', f'tick = "{TICK_S:g}s"'))
    return config


def test_a_burst_is_acted_on_before_the_first_tick(spawn, daemon, tmp_path):
    assert 'within = "50ms"' in BURST_POLICY
    victim = spawn(victim_argv(0, "--work-us", "1000"))
    hog = spawn(hog_argv("fluent-bit", 3))
    pin_workers(hog, (0, 0, 1))  # two threads on the victim's CPU: long waits on most wakeups
    started = time.monotonic()
    run = daemon(long_tick_config(tmp_path, victim.pid, BURST_POLICY))
    wait_until(lambda: all(nice == 10 for nice, _ in thread_settings(hog.pid).values()), TICK_S * 0.8,
               what="nice 10 on every hog thread before the first 10 s tick")
    acted_after_s = time.monotonic() - started
    assert run.stop() == 0
    acts = [line for line in run.audit() if line["decision"] == "act"]
    assert acts and acts[0]["step"]["action"] == "nice 10" and acts[0]["outcome"] == "applied"
    evidence = acts[0]["evidence"]
    assert evidence["trigger"] == "burst"
    assert evidence["protected_tail"]["waits_over"] >= 2
    assert evidence["protected_tail"]["span_ms"] <= 50
    print(f"acted {acted_after_s:.2f} s after the daemon started (first tick at {TICK_S:g} s)")


def test_without_within_nothing_acts_before_the_first_tick(spawn, daemon, tmp_path):
    """The same scene and policy without `within`: the control for the test above."""
    victim = spawn(victim_argv(0, "--work-us", "1000"))
    hog = spawn(hog_argv("fluent-bit", 3))
    pin_workers(hog, (0, 0, 1))
    run = daemon(long_tick_config(tmp_path, victim.pid, SHIPPER_POLICY.format(above="1ms", windows=2)))
    time.sleep(TICK_S * 0.6)
    assert all(nice == 0 for nice, _ in thread_settings(hog.pid).values())
    assert run.stop() == 0
    assert not [line for line in run.audit() if line["decision"] == "act"]
