"""Unnamed culprits on record: the top-blamed process no policy names goes in the audit, with its
evidence, at a bounded rate; named, protected or harmless ones do not."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from helpers.daemon import wait_until, write_config
from helpers.workloads import hog_argv, pin_workers, victim_argv
from remediator import histogram
from remediator.cli import main
from remediator.culprits import EVENT, CulpritSettings, CulpritState, unnamed_culprits
from remediator.policy import load_policies
from remediator.procfs import ProcessInfo
from remediator.sample import ProcessUsage, ProtectedWaits, Sample

TICK = 0.25
SERVICE = ProcessInfo(pid=100, start_time=10, comm="api")
SHIPPER = ProcessInfo(pid=200, start_time=20, comm="fluent-bit")
MINER = ProcessInfo(pid=300, start_time=30, comm="mine\x1b[2Jr", exe="/tmp/miner", cmdline=("./miner", "--all"), user="nobody")
POLICY = """
[[policy]]
name = "shippers"
description = "test"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { above = "2ms" }
offender = { cpu = 0.5 }
[[policy.actions]]
nice = 10
"""


def policies(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    return load_policies([path])


def sample(t=1.0, tail_us=5000.0, blame=((300, 0.6), (200, 0.1)), processes=(SERVICE, SHIPPER, MINER)):
    waits = [50_000] * 200 + [int(tail_us * 1000)] * 4
    total = sum(waits)
    duration_ns = int(TICK * 1e9)
    return Sample(
        ts=1_700_000_000 + t, start_ns=int((t - TICK) * 1e9), end_ns=int(t * 1e9), source="bpf", window_ns=50_000_000, ncpus=2,
        protected=ProtectedWaits(threads=1, pids=(100,), waits=len(waits), wakeups=len(waits), preemptions=0, wait_ns=total,
                                 max_ns=max(waits), histogram=tuple(sorted(histogram.from_values(waits).items()))),
        usage=(ProcessUsage(300, MINER.comm, duration_ns // 2, None),),
        blame=tuple((pid, int(share * total)) for pid, share in blame),
        cpu_busy_ns=(duration_ns, duration_ns), processes={p.pid: p for p in processes},
    )


def test_the_top_blamed_unnamed_process_is_recorded_with_its_evidence(tmp_path):
    records, state = unnamed_culprits(sample(), policies(tmp_path), CulpritState(), 1.0, self_pid=999)
    assert len(records) == 1
    record = records[0]
    assert record["decision"] == EVENT and record["event"] == "unnamed-culprit" and record["policy"] is None
    assert record["process"]["pid"] == 300 and record["process"]["start_time"] == 30
    assert record["process"]["exe"] == "/tmp/miner" and record["process"]["cmdline"] == "./miner --all"
    assert record["evidence"]["blame_share"] == 0.6 and record["evidence"]["cpu"] == 0.5
    tail = record["evidence"]["protected_tail"]
    assert tail["threshold_us"] == 2000.0 and tail["value_us"] > 2000 and tail["percentile"] == 99.0 and tail["policy"] == "shippers"
    assert "no policy names it" in record["message"]
    assert state.last_recorded == {MINER.identity: 1.0}


def test_the_audit_table_escapes_the_culprits_name(tmp_path):
    from remediator.audit import event_record, format_table

    records, _ = unnamed_culprits(sample(), policies(tmp_path), CulpritState(), 1.0, self_pid=999)
    table = format_table([event_record(1_700_000_001.0, "dry-run", records[0])])
    assert "\x1b" not in table and "unnamed-culprit" in table and "mine\\x1b[2Jr" in table


def test_named_protected_harmless_or_minor_culprits_are_not_recorded(tmp_path):
    p = policies(tmp_path)
    assert unnamed_culprits(sample(blame=((200, 0.6),)), p, CulpritState(), 1.0)[0] == []  # named by a policy
    assert unnamed_culprits(sample(blame=((100, 0.6),)), p, CulpritState(), 1.0)[0] == []  # the service itself
    assert unnamed_culprits(sample(tail_us=500.0), p, CulpritState(), 1.0)[0] == []  # tail under every threshold
    assert unnamed_culprits(sample(blame=((300, 0.1),)), p, CulpritState(), 1.0)[0] == []  # not the culprit
    # a child of a named process under a tree policy is governed, so not "unnamed"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "p.toml").write_text(POLICY.replace('comm = ["fluent-bit"]', 'comm = ["fluent-bit"]\ndescendants = true'))
    child = dataclasses.replace(MINER, ppid=200, start_time=40)
    assert unnamed_culprits(sample(processes=(SERVICE, SHIPPER, child)), load_policies([tree]), CulpritState(), 1.0)[0] == []


def test_a_worker_the_service_just_forked_is_its_own_not_a_culprit(tmp_path):
    """The kernel protects a fork at once, user space a tick later: until then the worker is not in the
    protected pids, yet it is the service's (its parent chain leads to the protected process, pid and
    start time), so it is no unnamed culprit; a foreign process blamed beside it still is."""
    p = policies(tmp_path)
    worker = ProcessInfo(pid=150, start_time=15, comm="api", ppid=100, ancestors=((100, "api"),))
    grandchild = ProcessInfo(pid=160, start_time=16, comm="sh", ppid=150, ancestors=((150, "api"), (100, "api")))
    scene = (SERVICE, SHIPPER, MINER, worker, grandchild)
    assert unnamed_culprits(sample(blame=((150, 0.7),), processes=scene), p, CulpritState(), 1.0, self_pid=999)[0] == []
    assert unnamed_culprits(sample(blame=((160, 0.7),), processes=scene), p, CulpritState(), 1.0, self_pid=999)[0] == []
    records, _ = unnamed_culprits(sample(blame=((150, 0.5), (300, 0.3)), processes=scene), p, CulpritState(), 1.0, self_pid=999)
    assert [r["process"]["pid"] for r in records] == [300]  # the next most blamed, foreign, is on record


def test_a_process_whose_parent_had_the_services_pid_before_it_is_foreign(tmp_path):
    """Its parent chain names pid 100, but the service holding pid 100 now started after it: the
    parent was another process whose pid was reused. Pid alone is no ancestry."""
    p = policies(tmp_path)
    orphan = ProcessInfo(pid=150, start_time=5, comm="miner", ppid=100, ancestors=((100, "api"),))
    records, _ = unnamed_culprits(sample(blame=((150, 0.7),), processes=(SERVICE, orphan)), p, CulpritState(), 1.0, self_pid=999)
    assert [r["process"]["pid"] for r in records] == [150]
    # and one level up: a parent of its own, whose parent had the service's pid before the service
    parent = ProcessInfo(pid=140, start_time=4, comm="sh", ppid=100, ancestors=((100, "api"),))
    child = ProcessInfo(pid=150, start_time=12, comm="miner", ppid=140, ancestors=((140, "sh"), (100, "api")))
    records, _ = unnamed_culprits(sample(blame=((150, 0.7),), processes=(SERVICE, parent, child)), p, CulpritState(), 1.0,
                                  self_pid=999)
    assert [r["process"]["pid"] for r in records] == [150]


def test_rate_is_bounded_per_process_and_across_the_host(tmp_path):
    p = policies(tmp_path)
    settings = CulpritSettings(per_process_s=600.0, max_records=2, window_s=600.0)
    state, written = CulpritState(), []
    for i in range(40):
        t = 1.0 + i * TICK
        records, state = unnamed_culprits(sample(t), p, state, t, settings)
        written += records
    assert len(written) == 1  # the same process: once per 10 minutes
    others = [dataclasses.replace(MINER, pid=400 + i, start_time=400 + i) for i in range(4)]
    for i, other in enumerate(others):
        t = 20.0 + i
        records, state = unnamed_culprits(sample(t, blame=((other.pid, 0.7),), processes=(SERVICE, other)), p, state, t, settings)
        written += records
    assert [r["process"]["pid"] for r in written] == [300, 400]  # host-wide cap: 2 per 10 minutes
    assert state.held_back == 3
    records, state = unnamed_culprits(sample(700.0), p, state, 700.0, settings)  # a new window, and 300's quiet time is over
    assert len(records) == 1 and records[0]["evidence"]["held_back"] == 3 and state.held_back == 0


def test_a_replay_puts_the_unnamed_culprit_on_record_as_the_daemon_would(capsys):
    """The recorded batch-job no policy names: replay's audit lines carry it once (the rate limit holds
    across its bursts), after the tick it was first on top in, in replay mode, with the evidence."""
    recordings = Path(__file__).resolve().parent / "fixtures" / "recordings"
    policy_dir = Path(__file__).resolve().parent.parent / "policies"
    assert main(["replay", str(recordings / "unnamed-batch-job.jsonl"), "--policies", str(policy_dir), "--request-cpus", "0",
                 "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    culprits = [r for r in records if r["decision"] == EVENT]
    assert len(culprits) == 1 and records == culprits  # and nothing acted: no policy names it
    culprit = culprits[0]
    assert culprit["process"]["comm"] == "batch-job" and culprit["mode"] == "replay" and culprit["policy"] is None
    assert culprit["evidence"]["blame_share"] >= 0.2 and culprit["evidence"]["off_limits"] is None
    assert culprit["evidence"]["protected_tail"]["value_us"] > culprit["evidence"]["protected_tail"]["threshold_us"]


@pytest.mark.bpf
def test_a_live_daemon_puts_an_unnamed_hog_on_record(spawn, daemon, tmp_path):
    if os.sched_getaffinity(0) != {0, 1}:
        pytest.skip("the scene needs CPUs 0 and 1")
    victim = spawn(victim_argv(0, "--work-us", "1000"))
    hog = spawn(hog_argv("miner", 2))
    pin_workers(hog, (0, 0))
    run = daemon(write_config(tmp_path, [victim.pid], mode="dry-run"))  # the policy names fluent-bit only
    found = wait_until(lambda: [r for r in run.audit() if r["decision"] == "unnamed-culprit"], 10.0, what="an unnamed-culprit record")
    time.sleep(1.0)
    records = [r for r in run.audit() if r["decision"] == "unnamed-culprit"]
    print(found[0]["message"], found[0]["evidence"])
    assert found[0]["process"]["pid"] == hog.pid and found[0]["process"]["comm"] == "miner"
    assert found[0]["evidence"]["blame_share"] >= 0.2 and found[0]["mode"] == "dry-run"
    assert len(records) == 1  # once per process per 10 minutes, however many ticks it stays on top
    assert [r for r in run.audit() if r["decision"] == "act"] == []
    assert run.stop() == 0
