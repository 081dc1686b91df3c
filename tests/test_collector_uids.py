"""A process that drops to another user after the collector first read it (a daemon started as
root that setuid()s to its own user, as backup agents and shippers do) sends no event the
collector hears: where a policy matches on user, the re-check of a cached reading reads its uids,
so the `user` policy comes to govern it, and the burst watch judges it again."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from helpers.fakeproc import FakeProc, FakeProcess
from helpers.sources import Clock, RecordingSource
from remediator.collector import Collector
from remediator.policy import load_policies
from remediator.procfs import ProcFS
from remediator.selectors import ProtectSelectors
from remediator.trees import governing

NOBODY = 65534

POLICIES = """
[[policy]]
name = "backups-of-nobody"
description = "a policy that matches on user"
[policy.match]
comm = ["backup-agent"]
user = ["65534"]
[policy.trigger]
always = true
[[policy.actions]]
nice = 10
"""


def collector_over(procfs: ProcFS, clock: Clock) -> Collector:
    collector = Collector(RecordingSource(), ProtectSelectors.build(comms=["api"]), procfs, rescan_s=5.0,
                          mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    return collector


def test_the_re_check_of_a_cached_reading_sees_a_new_uid_where_a_policy_matches_on_user(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(30, "backup-agent", uid=0))
    proc.write()
    clock = Clock()
    collector = collector_over(ProcFS(proc.root), clock)
    collector.recheck_uids = True
    assert collector.info(30).uid == 0
    proc.processes[30].uid = NOBODY
    proc.write()
    clock.now += 1
    assert collector.info(30).uid == 0  # trusted as read for the rescan interval
    clock.now += 5
    assert (collector.info(30).uid, collector.info(30).euid) == (NOBODY, NOBODY)
    collector.sample()
    assert 30 in collector.changed  # the burst watch judges it again this tick
    collector.sample()
    assert 30 not in collector.changed


def test_without_a_user_policy_the_re_check_reads_no_status_file(tmp_path, monkeypatch):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(30, "backup-agent", uid=0))
    proc.write()
    clock = Clock()
    procfs = ProcFS(proc.root)
    collector = collector_over(procfs, clock)
    collector.info(30)
    reads: list[int] = []
    monkeypatch.setattr(procfs, "uids", lambda pid: reads.append(pid) or (0, 0))
    clock.now += 6
    assert collector.info(30).uid == 0 and reads == []


# Names itself backup-agent and runs as root; on SIGUSR1 drops to nobody (real, effective and
# saved uid), as a daemon does once started.
DROPPING = """
import ctypes, os, signal, time
ctypes.CDLL(None).prctl(15, b"backup-agent", 0, 0, 0)
def drop(*_):
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
signal.signal(signal.SIGUSR1, drop)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


@pytest.mark.root
def test_a_real_process_that_drops_to_a_user_comes_under_that_users_policy(tmp_path, spawn):
    path = tmp_path / "policies.toml"
    path.write_text(POLICIES)
    policies = load_policies([path])
    assert policies.matches_user
    agent = spawn([sys.executable, "-c", DROPPING])
    pid = agent.pid
    clock = Clock()
    collector = collector_over(ProcFS(), clock)
    collector.recheck_uids = policies.matches_user
    before = collector.info(pid)
    assert before.uid == 0 and governing(before, {pid: before}, policies) is None
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while ProcFS().uids(pid) != (NOBODY, NOBODY):
        assert time.monotonic() < deadline, "the process did not drop to nobody"
        time.sleep(0.01)
    clock.now += 6
    after = collector.info(pid)
    assert after.uid == NOBODY and governing(after, {pid: after}, policies).policy.name == "backups-of-nobody"
