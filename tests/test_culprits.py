"""Culprits on record: the top-blamed process no policy names goes in the audit, with its evidence,
at a bounded rate; named, protected (or forked by the protected) or harmless ones do not. A bad tail
that is the service's own doing goes there too, once per service per 10 minutes, unless the
engine's own records of that tick already carry it."""

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
from remediator.audit import CulpritWriter
from remediator.culprits import EVENT, SELF_INFLICTED_EVENT, CulpritSettings, CulpritState, self_inflicted_tail, unnamed_culprits
from remediator.engine import Decision, EngineSettings, EngineState
from remediator.policy import load_policies
from remediator.procfs import ProcessInfo
from remediator.sample import ProcessUsage, ProtectedWaits, Sample, Throttling
from remediator.tick import Carried, TickReport

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
    records, state = unnamed_culprits(sample(), policies(tmp_path), CulpritState(), 1.0)
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

    records, _ = unnamed_culprits(sample(), policies(tmp_path), CulpritState(), 1.0)
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
    assert unnamed_culprits(sample(blame=((150, 0.7),), processes=scene), p, CulpritState(), 1.0)[0] == []
    assert unnamed_culprits(sample(blame=((160, 0.7),), processes=scene), p, CulpritState(), 1.0)[0] == []
    records, _ = unnamed_culprits(sample(blame=((150, 0.5), (300, 0.3)), processes=scene), p, CulpritState(), 1.0)
    assert [r["process"]["pid"] for r in records] == [300]  # the next most blamed, foreign, is on record


def test_a_process_whose_parent_had_the_services_pid_before_it_is_foreign(tmp_path):
    """Its parent chain names pid 100, but the service holding pid 100 now started after it: the
    parent was another process whose pid was reused. Pid alone is no ancestry."""
    p = policies(tmp_path)
    orphan = ProcessInfo(pid=150, start_time=5, comm="miner", ppid=100, ancestors=((100, "api"),))
    records, _ = unnamed_culprits(sample(blame=((150, 0.7),), processes=(SERVICE, orphan)), p, CulpritState(), 1.0)
    assert [r["process"]["pid"] for r in records] == [150]
    # and one level up: a parent of its own, whose parent had the service's pid before the service
    parent = ProcessInfo(pid=140, start_time=4, comm="sh", ppid=100, ancestors=((100, "api"),))
    child = ProcessInfo(pid=150, start_time=12, comm="miner", ppid=140, ancestors=((140, "sh"), (100, "api")))
    records, _ = unnamed_culprits(sample(blame=((150, 0.7),), processes=(SERVICE, parent, child)), p, CulpritState(), 1.0)
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


def own_sample(t=1.0, own=0.0, others=0.1, throttled=None, tail_us=5000.0, processes=(SERVICE, SHIPPER, MINER)):
    """A tick whose protected wait went `own` behind its own threads and `others` behind others (shares
    of it), with `throttled` (a share of it too) under its own quota, or not measured (None)."""
    base = sample(t, tail_us, blame=((200, others),), processes=processes)
    total = base.protected.wait_ns
    waits = dataclasses.replace(base.protected, own_ns=int(own * total), blamed_ns=int(others * total),
                                unattributed_ns=max(0, total - int(own * total) - int(others * total)))
    throttling = None if throttled is None else Throttling(("/api.slice",), 5, 4, int(throttled * total))
    return dataclasses.replace(base, protected=waits, throttling=throttling)


def test_a_tail_the_services_own_quota_makes_is_on_record_with_its_evidence(tmp_path):
    scene = own_sample(own=0.1, others=0.15, throttled=0.6)
    records, state = self_inflicted_tail(scene, policies(tmp_path), CulpritState(), 1.0)
    assert len(records) == 1
    record = records[0]
    assert record["decision"] == record["event"] == SELF_INFLICTED_EVENT == "self-inflicted-tail" and record["policy"] is None
    assert (record["process"]["pid"], record["process"]["start_time"], record["process"]["comm"]) == (100, 10, "api")
    evidence, total = record["evidence"], scene.protected.wait_ns
    tail = evidence["protected_tail"]
    assert tail["threshold_us"] == 2000.0 and tail["value_us"] > 2000 and tail["policy"] == "shippers"
    assert evidence["protected_wait"] == {"wait_ns": total, "behind_own_ns": int(0.1 * total),
                                          "behind_others_ns": int(0.15 * total), "unattributed_ns": scene.protected.unattributed_ns}
    assert evidence["protected_throttling"]["throttled_ns"] == int(0.6 * total) and evidence["protected_pids"] == [100]
    assert "throttled by its own CPU quota" in record["message"] and "Nothing was done" in record["message"]
    assert state.self_inflicted_at == {SERVICE.identity: 1.0}


def test_a_tail_behind_its_own_threads_is_self_inflicted_without_a_quota(tmp_path):
    records, _ = self_inflicted_tail(own_sample(own=0.6, others=0.1), policies(tmp_path), CulpritState(), 1.0)
    assert len(records) == 1 and records[0]["evidence"]["protected_throttling"] is None
    assert "behind its own threads" in records[0]["message"] and "quota not measured" in records[0]["message"]


def test_neighbours_a_fine_tail_or_no_threshold_make_no_self_inflicted_record(tmp_path):
    p = policies(tmp_path)
    assert self_inflicted_tail(own_sample(own=0.1, others=0.5, throttled=0.3), p, CulpritState(), 1.0)[0] == []  # others ran longer
    assert self_inflicted_tail(own_sample(own=0.1, others=0.05), p, CulpritState(), 1.0)[0] == []  # little of it own: unattributed
    assert self_inflicted_tail(own_sample(own=0.9, others=0.0, tail_us=500.0), p, CulpritState(), 1.0)[0] == []  # a fine tail
    always = tmp_path / "always"
    always.mkdir()
    (always / "p.toml").write_text(POLICY.replace('tail = { above = "2ms" }\noffender = { cpu = 0.5 }', "always = true"))
    assert self_inflicted_tail(own_sample(own=0.9, others=0.0), load_policies([always]), CulpritState(), 1.0)[0] == []  # no threshold


def test_self_inflicted_records_are_bounded_per_service(tmp_path):
    p = policies(tmp_path)
    settings = CulpritSettings(per_service_s=600.0)
    state, written = CulpritState(), []
    for i in range(40):
        t = 1.0 + i * TICK
        records, state = self_inflicted_tail(own_sample(t, throttled=0.6), p, state, t, settings)
        written += records
    assert len(written) == 1  # once per 10 minutes, however long it lasts
    restarted = dataclasses.replace(SERVICE, start_time=50)  # the same pid, another service instance
    records, state = self_inflicted_tail(own_sample(20.0, throttled=0.6, processes=(restarted,)), p, state, 20.0, settings)
    assert [r["process"]["start_time"] for r in records] == [50]
    records, state = self_inflicted_tail(own_sample(700.0, throttled=0.6), p, state, 700.0, settings)
    assert len(records) == 1 and state.self_inflicted_at == {SERVICE.identity: 700.0}  # and what is older than 10 minutes goes
    records, state = unnamed_culprits(sample(701.0), p, state, 701.0)  # one state for both kinds: neither forgets the other's
    assert len(records) == 1 and state.self_inflicted_at == {SERVICE.identity: 700.0}


def tail_decision(kind, p, evidence, t=1.0):
    return Decision(kind, t, 1_700_000_000 + t, SHIPPER, p.policies[0], kind, evidence=evidence)


def test_what_the_engine_put_on_record_in_the_same_tick_is_not_written_twice(tmp_path):
    p = policies(tmp_path)
    scene = own_sample(throttled=0.6)
    acted = tail_decision("act", p, {"protected_tail": {"percentile": 99.0}})
    records, state = self_inflicted_tail(scene, p, CulpritState(), 1.0, decisions=[acted])
    assert records == [] and state == CulpritState()  # the act's record carries the tail: nothing to add
    assert len(self_inflicted_tail(scene, p, state, 1.25)[0]) == 1  # the next tick without one: on record

    skipped = tail_decision("skipped", p, {"protected_tail": {"percentile": 99.0}, "skipped": "self-inflicted"})
    records, state = self_inflicted_tail(scene, p, CulpritState(), 1.0, decisions=[skipped])
    assert records == [] and state.self_inflicted_at == {SERVICE.identity: 1.0}  # the engine's skip is the record
    assert self_inflicted_tail(scene, p, state, 1.25)[0] == []
    assert len(self_inflicted_tail(scene, p, state, 601.0)[0]) == 1

    unrelated = [tail_decision("verify", p, {"verdict": "helped"}), tail_decision("act", p, {"trigger": "always"})]
    assert len(self_inflicted_tail(scene, p, CulpritState(), 1.0, decisions=unrelated)[0]) == 1


def test_the_writer_judges_by_the_decisions_heard_since_the_last_tick(tmp_path):
    """CulpritWriter (the daemon's and replay's observer) passes on the decisions it heard, then forgets them."""
    p = policies(tmp_path)
    written = []
    writer = CulpritWriter(written.append)
    settings = EngineSettings(frozenset({0}), frozenset({0, 1}), 10, self_pid=999)
    acted = tail_decision("act", p, {"protected_tail": {"percentile": 99.0}})
    writer.on_decision(Carried(acted, None, "replay", EngineState()))
    writer.on_tick(TickReport(own_sample(1.0, throttled=0.6), p, settings, EngineState(), "replay", ()))
    assert written == []
    writer.on_tick(TickReport(own_sample(1.25, throttled=0.6), p, settings, EngineState(), "replay", ()))
    assert [(r["decision"], r["mode"], r["epoch"]) for r in written] == [(SELF_INFLICTED_EVENT, "replay", 1_700_000_001.25)]


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
