"""Burst detection without a kernel: the probe's counting (burst_note in sched_monitor.h, compiled
with gcc) on scenes of protected waits, and the engine's decide_burst on what it reports.

The scenes: isolated single spikes (none may fire: a lone spike never acts), pairs inside and
outside the span, one wait seen twice, waits under the threshold, a sustained burst (fires at
most once per span).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from remediator.engine import BurstEvidence, EngineState, decide_burst, record_outcome
from remediator.procfs import ProcessInfo

from test_engine import SERVICE, SETTINGS, SHIPPER, LADDER, policies

PROBES = Path(__file__).resolve().parent.parent / "probes"
MS = 1_000_000

COUNTER = r"""
#define SCHED_MONITOR_STANDALONE
#include <stdio.h>
#include <string.h>
#include "sched_monitor.h"
/* stdin: "threshold_ns count span_ns", then one "wait_ns end_ns" per wait; stdout: 1 or 0 per wait */
int main(void)
{
    struct burst_candidate c;
    unsigned long long threshold, span, wait, end, first;
    unsigned count;
    memset(&c, 0, sizeof(c));
    if (scanf("%llu %u %llu", &threshold, &count, &span) != 3)
        return 2;
    c.threshold_ns = threshold; c.count = count; c.span_ns = span;
    while (scanf("%llu %llu", &wait, &end) == 2) {
        u64 first_ts = 0;
        int fired = burst_note(&c, wait, end, &first_ts);
        first = first_ts;
        printf("%d %llu\n", fired, first);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile the probe header")
    directory = tmp_path_factory.mktemp("burst")
    (directory / "counter.c").write_text(COUNTER)
    binary = directory / "counter"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", f"-I{PROBES}", "-o", str(binary), str(directory / "counter.c")], check=True)

    def fire(waits, threshold=2 * MS, count=2, span=50 * MS):
        text = f"{threshold} {count} {span}\n" + "\n".join(f"{wait} {end}" for wait, end in waits)
        out = subprocess.run([str(binary)], input=text, capture_output=True, text=True, check=True).stdout
        return [(int(a), int(b)) for a, b in (line.split() for line in out.splitlines())]

    return fire


def fired_at(results, waits):
    return [end for (fired, _first), (_wait, end) in zip(results, waits) if fired]


def test_isolated_single_spikes_never_fire(counter):
    # 5 ms spikes, each alone: 60 ms to 1 s apart (all longer than the span)
    ends, t = [], 1_000 * MS
    for gap_ms in [60, 200, 1000, 51, 75] * 20:
        t += gap_ms * MS
        ends.append(t)
    waits = [(5 * MS, end) for end in ends]
    assert fired_at(counter(waits), waits) == []


def test_two_over_threshold_waits_within_the_span_fire_at_the_second(counter):
    waits = [(3 * MS, 1_000 * MS), (4 * MS, 1_030 * MS)]
    assert counter(waits) == [(0, 0), (1, 1_000 * MS)]


def test_two_waits_further_apart_than_the_span_do_not(counter):
    waits = [(3 * MS, 1_000 * MS), (4 * MS, 1_051 * MS)]
    assert fired_at(counter(waits), waits) == []


def test_one_wait_counts_once_however_many_runs_it_is_blamed_for(counter):
    # attribute_wait calls once per blamed run: the same wait end, several times
    waits = [(3 * MS, 1_000 * MS)] * 4
    assert fired_at(counter(waits), waits) == []


def test_waits_under_the_threshold_never_count(counter):
    waits = [(2 * MS, 1_000 * MS + i * MS) for i in range(100)]  # equal to the threshold: not over it
    assert fired_at(counter(waits), waits) == []


def test_a_larger_count_needs_that_many(counter):
    waits = [(3 * MS, 1_000 * MS), (3 * MS, 1_010 * MS), (3 * MS, 1_020 * MS)]
    assert [fired for fired, _ in counter(waits, count=3)] == [0, 0, 1]
    assert fired_at(counter(waits[:2], count=3), waits[:2]) == []


def test_a_sustained_burst_fires_at_most_once_per_span(counter):
    waits = [(3 * MS, 1_000 * MS + i * 5 * MS) for i in range(40)]  # 200 ms of 3 ms waits every 5 ms
    fired = fired_at(counter(waits), waits)
    assert fired[0] == 1_005 * MS
    assert len(fired) == 4 and all(b - a >= 50 * MS for a, b in zip(fired, fired[1:]))


# -- the engine -----------------------------------------------------------------------------------

BURST_LADDER = LADDER.replace("windows = {n}, of = {m} }}", 'windows = {n}, of = {m}, within = "50ms", waits = 2 }}')
BURST = BurstEvidence(waits=2, first_s=100.00, last_s=100.03, last_wait_us=3000.0)


def burst_policies(tmp_path, **kwargs):
    text = BURST_LADDER.format(n=2, m=4, offender='{ blame_share = 0.2 }', cooldown=kwargs.get("cooldown", "10s"),
                               hourly=kwargs.get("hourly", 6), quiet="5s")
    return policies(tmp_path, text=text)


def decide_at(policy_set, now, state=None, burst=BURST, info=SHIPPER, protected=(SERVICE.pid,)):
    return decide_burst(state or EngineState(), info, burst, policy_set, SETTINGS, protected, [], now, 1_700_000_000 + now)


def test_a_counted_burst_takes_the_first_step_with_its_evidence(tmp_path):
    policy_set = burst_policies(tmp_path)
    state, decisions = decide_at(policy_set, 100.04)
    assert [d.kind for d in decisions] == ["act"]
    act = decisions[0]
    assert act.step.describe() == "nice 10" and act.request.params == {"nice": 10}
    assert act.evidence["trigger"] == "burst"
    assert act.evidence["protected_tail"] == {"waits_over": 2, "threshold_us": 2000.0, "within_ms": 50.0,
                                              "span_ms": 30.0, "last_wait_us": 3000.0}


def test_a_lone_spike_or_a_slow_pair_never_acts(tmp_path):
    policy_set = burst_policies(tmp_path)
    lone = BurstEvidence(waits=1, first_s=100.0, last_s=100.0, last_wait_us=9000.0)
    slow = BurstEvidence(waits=2, first_s=100.0, last_s=100.2, last_wait_us=3000.0)
    for burst in (lone, slow):
        assert decide_at(policy_set, 100.3, burst=burst)[1] == []


def test_a_policy_without_within_and_an_unnamed_process_never_act_on_a_burst(tmp_path):
    plain = policies(tmp_path, n=2, m=4)
    assert decide_at(plain, 100.04)[1] == []
    stranger = ProcessInfo(pid=300, start_time=30, comm="postgres", exe="/usr/bin/postgres")
    assert decide_at(burst_policies(tmp_path), 100.04, info=stranger)[1] == []


def test_the_protected_service_is_never_acted_on(tmp_path):
    _state, decisions = decide_at(burst_policies(tmp_path), 100.04, protected=(SERVICE.pid, SHIPPER.pid))
    assert [d.kind for d in decisions] == ["excluded"]


# A fluent-bit the protected service forked: by start time after it, under it.
SERVICES_SHIPPER = ProcessInfo(pid=210, start_time=50, comm="fluent-bit", ppid=SERVICE.pid, ancestors=((SERVICE.pid, "api"),))


def test_a_worker_the_service_forked_is_never_acted_on(tmp_path):
    state, decisions = decide_burst(EngineState(), SERVICES_SHIPPER, BURST, burst_policies(tmp_path), SETTINGS, (SERVICE.pid,),
                                    [], 100.04, 1_700_000_100.04, {SERVICE.pid: SERVICE})
    assert [(d.kind, d.message.split(": ")[-1]) for d in decisions] == [("excluded", "a child of the protected service (api, pid 100)")]


def test_settle_then_the_next_step_and_no_step_past_the_last(tmp_path):
    policy_set = burst_policies(tmp_path)
    state, decisions = decide_at(policy_set, 100.04)
    state = record_outcome(state, decisions[0], "applied", policy_set)
    assert decide_at(policy_set, 100.5, state)[1] == []  # settling (1 s)
    state, decisions = decide_at(policy_set, 101.1, state)
    assert [d.step.describe() for d in decisions] == ["affinity unprotected"]
    state = record_outcome(state, decisions[0], "applied", policy_set)
    state, decisions = decide_at(policy_set, 102.2, state)
    assert [d.kind for d in decisions] == ["exhausted"]


def test_the_hourly_cap_holds_for_bursts(tmp_path):
    policy_set = burst_policies(tmp_path, hourly=1)
    state, decisions = decide_at(policy_set, 100.04)
    state = record_outcome(state, decisions[0], "applied", policy_set)
    _state, decisions = decide_at(policy_set, 101.5, state)
    assert [d.kind for d in decisions] == ["capped"]


# -- BurstWatch: the candidate map kept current --------------------------------------------------

class FakeBurstSource:
    def __init__(self):
        self.candidates: dict = {}
        self.exec_pids: list[int] = []
        self.inherited: set[int] = set()
        self.dropped: list[int] = []

    def poll_bursts(self, timeout_s):
        return []

    def set_burst_candidates(self, candidates):
        self.candidates = dict(candidates)

    def take_exec_pids(self):
        pids, self.exec_pids = self.exec_pids, []
        return pids

    def inherited_burst_candidates(self):
        return set(self.inherited)

    def drop_burst_candidates(self, tgids):
        self.dropped += list(tgids)


class FakeProcs:
    def __init__(self, *infos):
        self.infos = {info.pid: info for info in infos}
        self.reads = 0
        self.listings = 0
        self.shared: list[int] | None = None  # what recent_pids gives: the collector's listing of the tick

    def pids(self):
        self.listings += 1
        return list(self.infos)

    def recent_pids(self, max_age_s):
        return None if self.shared is None else list(self.shared)

    def process_info(self, pid):
        from remediator.errors import ProcessGone
        self.reads += 1
        if pid not in self.infos:
            raise ProcessGone(pid)
        return self.infos[pid]


def test_burstwatch_names_governed_processes_with_their_policys_count(tmp_path):
    from remediator.burstwatch import BurstWatch
    from remediator.probes import BurstCandidate, BurstEvent

    source, procs = FakeBurstSource(), FakeProcs(SERVICE, SHIPPER, ProcessInfo(pid=300, start_time=30, comm="postgres"))
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert source.candidates == {SHIPPER.pid: BurstCandidate(threshold_ns=2_000_000, count=2, span_ns=50_000_000)}
    reads = procs.reads
    watch.refresh([SERVICE, SHIPPER], [SERVICE.pid])  # known processes are not judged again
    assert procs.reads == reads
    # a fork child the kernel made a candidate is judged at its first event; a thread's entry is dropped
    child = ProcessInfo(pid=201, start_time=21, comm="fluent-bit")
    procs.infos[child.pid] = child
    reads = procs.reads
    info, burst = watch.evidence(BurstEvent(mono_ns=int(100.03e9), first_ns=int(100.0e9), wait_ns=3_000_000, tgid=201, count=2))
    assert info == child and burst.waits == 2 and abs(burst.last_s - burst.first_s - 0.03) < 1e-9
    assert procs.reads == reads + 1  # judged at its first event, and that reading serves the event too
    assert watch.evidence(BurstEvent(int(1e9), int(1e9), 3_000_000, tgid=300, count=2)) is None  # no within-policy
    source.inherited = {201, 4242}
    watch.clock = lambda: 10.0
    watch.refresh([], [SERVICE.pid])
    assert source.dropped == [4242] and set(source.candidates) == {SHIPPER.pid, 201}



def test_burstwatch_judges_new_pids_from_sketches_and_reads_a_would_be_candidate_in_full(tmp_path):
    """Most new processes are governed by no policy: they are judged from a sketch (comm, exe,
    cmdline, ancestors; no cgroup or status file), and only a would-be candidate is read in full,
    so its evidence and the safety rules have the whole reading. A policy naming a user (or a
    cgroup or unit) cannot be judged from a sketch: then every pid is read in full."""
    import dataclasses

    from remediator.burstwatch import BurstWatch
    from remediator.probes import BurstEvent

    shipper = dataclasses.replace(SHIPPER, uid=0, user="root", cgroup="/system.slice/fluent-bit.service")
    postgres = ProcessInfo(pid=300, start_time=30, comm="postgres", uid=70, user="postgres")
    full = {info.pid: info for info in (SERVICE, shipper, postgres)}
    sketched: list[int] = []
    read: list[int] = []

    def sketch_of(pid):
        sketched.append(pid)
        info = full.get(pid)
        return None if info is None else ProcessInfo(pid=pid, start_time=info.start_time, comm=info.comm)

    def info_of(pid):
        read.append(pid)
        return full.get(pid)

    source = FakeBurstSource()
    watch = BurstWatch(source, FakeProcs(*full.values()), daemon=None, clock=lambda: 0.0, info_of=info_of,
                       sketch_of=sketch_of)
    watch.set_policies(burst_policies(tmp_path))
    assert watch.reader is sketch_of
    watch.refresh([], [SERVICE.pid])
    assert set(source.candidates) == {shipper.pid}
    assert sorted(sketched) == sorted(full) and read == [shipper.pid]
    info, _burst = watch.evidence(BurstEvent(mono_ns=int(100.03e9), first_ns=int(100.0e9), wait_ns=3_000_000,
                                             tgid=shipper.pid, count=2))
    assert info == shipper  # the whole reading, not the sketch
    # A pid taken by another process between the sketch and the full read is no candidate.
    full[shipper.pid] = dataclasses.replace(shipper, start_time=99)
    source.exec_pids = [shipper.pid]
    sketch_of_before = sketch_of

    def stale_sketch(pid):
        return ProcessInfo(pid=pid, start_time=shipper.start_time, comm="fluent-bit") if pid == shipper.pid else sketch_of_before(pid)

    watch.sketch_of = stale_sketch
    watch.refresh([], [SERVICE.pid])
    assert shipper.pid not in source.candidates
    # A policy naming a user: judged from full readings.
    with_user = BURST_LADDER.format(n=2, m=4, offender='{ blame_share = 0.2 }', cooldown="10s", hourly=6, quiet="5s")
    with_user = with_user.replace('comm = ["fluent-bit"]', 'comm = ["fluent-bit"]\nuser = ["root"]')
    watch.set_policies(policies(tmp_path, text=with_user))
    assert watch.reader is info_of


# -- trees: a burst of a shipper's child is governed as at the tick ------------------------------

SHIPPED = Path(__file__).resolve().parent.parent / "policies"
VECTOR = ProcessInfo(pid=400, start_time=40, comm="vector", exe="/usr/bin/vector")
XZ_UNDER_VECTOR = ProcessInfo(pid=401, start_time=41, comm="xz", exe="/usr/bin/xz", ppid=400, ancestors=((400, "vector"),))


def test_a_burst_of_an_xz_under_vector_is_governed_by_the_log_shippers_tree_policy():
    from remediator.policy import load_policies

    shipped = load_policies([SHIPPED])
    state, decisions = decide_burst(EngineState(), XZ_UNDER_VECTOR, BURST, shipped, SETTINGS, (SERVICE.pid,), [], 100.04,
                                    1_700_000_100.04, {VECTOR.pid: VECTOR})
    assert [(d.kind, d.policy.name, d.info.pid, d.step.describe()) for d in decisions] == \
        [("act", "log-shippers", XZ_UNDER_VECTOR.pid, "cpu_idle")]  # the child that ran gets the step, not the parent
    assert decisions[0].evidence["match"].startswith("descendant of vector (pid 400)")
    # Without its parent known, or under a parent that started after it (a reused pid), no policy names an xz.
    assert decide_burst(EngineState(), XZ_UNDER_VECTOR, BURST, shipped, SETTINGS, (SERVICE.pid,), [], 100.04, 0.0)[1] == []
    reused = ProcessInfo(pid=400, start_time=50, comm="vector")
    assert decide_burst(EngineState(), XZ_UNDER_VECTOR, BURST, shipped, SETTINGS, (SERVICE.pid,), [], 100.04, 0.0,
                        {reused.pid: reused})[1] == []


def test_burstwatch_makes_a_tree_policys_children_candidates():
    from remediator.burstwatch import BurstWatch
    from remediator.policy import load_policies
    from remediator.probes import BurstEvent

    source, procs = FakeBurstSource(), FakeProcs(SERVICE, VECTOR, XZ_UNDER_VECTOR)
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(load_policies([SHIPPED]))
    watch.refresh([], [SERVICE.pid])
    assert set(source.candidates) == {VECTOR.pid, XZ_UNDER_VECTOR.pid}
    info, _burst = watch.evidence(BurstEvent(mono_ns=int(100.03e9), first_ns=int(100.0e9), wait_ns=3_000_000,
                                             tgid=XZ_UNDER_VECTOR.pid, count=2))
    assert info == XZ_UNDER_VECTOR and watch.ancestors_of(info) == {VECTOR.pid: VECTOR}


def test_burstwatch_never_makes_a_worker_the_service_forked_a_candidate(tmp_path):
    from remediator.burstwatch import BurstWatch

    unrelated = ProcessInfo(pid=220, start_time=22, comm="fluent-bit")
    source, procs = FakeBurstSource(), FakeProcs(SERVICE, SERVICES_SHIPPER, unrelated)
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert set(source.candidates) == {unrelated.pid}
    # Nor at its first event (a fork the kernel made a candidate): judged as at the tick.
    from remediator.probes import BurstEvent

    late = ProcessInfo(pid=211, start_time=51, comm="fluent-bit", ppid=SERVICE.pid, ancestors=((SERVICE.pid, "api"),))
    procs.infos[late.pid] = late
    assert watch.evidence(BurstEvent(mono_ns=int(100.03e9), first_ns=int(100.0e9), wait_ns=3_000_000, tgid=late.pid, count=2)) is None
    assert late.pid not in watch.candidates()


def test_burstwatch_reads_a_candidates_ancestors_through_the_collectors_cache():
    # A new child is judged with its parent chain; with the collector's cache (info_of) the chain
    # comes from there, as at the tick, and /proc is not read again for every ancestor.
    from remediator.burstwatch import BurstWatch
    from remediator.policy import load_policies

    source, procs = FakeBurstSource(), FakeProcs(SERVICE, VECTOR, XZ_UNDER_VECTOR)
    asked: list[int] = []

    def cached(pid):
        asked.append(pid)
        return procs.infos.get(pid)

    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0, info_of=cached)
    watch.set_policies(load_policies([SHIPPED]))
    watch.refresh([XZ_UNDER_VECTOR], [SERVICE.pid])
    assert XZ_UNDER_VECTOR.pid in source.candidates and VECTOR.pid in asked
    assert watch.ancestors_of(XZ_UNDER_VECTOR) == {VECTOR.pid: VECTOR}
    assert procs.reads == 0
    # An ancestor the cache no longer knows (gone) ends the chain: no policy names the xz then.
    del procs.infos[VECTOR.pid]
    assert watch.ancestors_of(XZ_UNDER_VECTOR) == {}


def test_the_burst_floor_is_written_only_when_it_changes():
    # set_burst_candidates runs every tick; the floor map took one syscall each time, changed or not.
    from remediator.probes import BurstCandidate, SchedProbes

    class FakeMap:
        def __init__(self):
            self.entries: dict[bytes, bytes] = {}
            self.writes = 0

        def update(self, key, value, flags=0):
            self.entries[key] = value
            self.writes += 1

        def delete(self, key):
            self.entries.pop(key, None)

    probes = SchedProbes.__new__(SchedProbes)  # the map logic only: no kernel
    probes._maps = {"burst_candidates": FakeMap(), "burst_floor": FakeMap()}
    probes._burst_candidates, probes._burst_floor = {}, None
    floor = probes._maps["burst_floor"]
    slow, fast = BurstCandidate(threshold_ns=2 * MS, count=2, span_ns=50 * MS), BurstCandidate(1 * MS, 2, 50 * MS)
    probes.set_burst_candidates({10: slow})
    probes.set_burst_candidates({10: slow})
    assert floor.writes == 1 and floor.entries[b"\0\0\0\0"] == (2 * MS).to_bytes(8, "little")
    probes.set_burst_candidates({10: slow, 11: fast})
    assert floor.writes == 2 and floor.entries[b"\0\0\0\0"] == (1 * MS).to_bytes(8, "little")
    probes.set_burst_candidates({})
    assert floor.writes == 3 and floor.entries[b"\0\0\0\0"] == bytes(8)
    assert probes._maps["burst_candidates"].entries == {}


def test_burstwatch_scans_with_the_collectors_listing_of_the_tick_when_it_has_one(tmp_path):
    from remediator.burstwatch import OWN_SCAN_AFTER_S, SCAN_EVERY_S, BurstWatch

    procs = FakeProcs(SERVICE, SHIPPER)
    now = [0.0]
    watch = BurstWatch(FakeBurstSource(), procs, daemon=None, clock=lambda: now[0])
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert procs.listings == 1 and SHIPPER.pid in watch._candidates
    # Past half the period, the collector listed /proc this tick: that listing serves, a new
    # shipper in it is judged, and /proc is not listed a second time.
    newcomer = ProcessInfo(pid=210, start_time=22, comm="fluent-bit")
    procs.infos[newcomer.pid] = newcomer
    procs.shared = [SERVICE.pid, SHIPPER.pid, newcomer.pid]
    now[0] = SCAN_EVERY_S / 2
    watch.refresh([], [SERVICE.pid])
    assert procs.listings == 1 and newcomer.pid in watch._candidates
    # Before half the period a shared listing is not taken (the scan just ran); at the full
    # period with none shared, it waits for one; past OWN_SCAN_AFTER_S it lists /proc itself.
    procs.shared = [SERVICE.pid]
    now[0] += 1.0
    watch.refresh([], [SERVICE.pid])
    assert newcomer.pid in watch._candidates
    procs.shared = None
    now[0] += SCAN_EVERY_S - 1.0
    watch.refresh([], [SERVICE.pid])
    assert procs.listings == 1
    now[0] = SCAN_EVERY_S / 2 + OWN_SCAN_AFTER_S
    watch.refresh([], [SERVICE.pid])
    assert procs.listings == 2


def test_burstwatch_falls_in_step_with_the_collectors_listings(tmp_path):
    """The daemon's first refresh lists /proc, and the collector's first rescan lists it a tick
    later: after one period the burst watch takes the collector's listings and makes none."""
    from remediator.burstwatch import SCAN_EVERY_S, BurstWatch

    procs = FakeProcs(SERVICE, SHIPPER)
    now = [0.0]
    watch = BurstWatch(FakeBurstSource(), procs, daemon=None, clock=lambda: now[0])
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert procs.listings == 1
    tick = 0.25
    for step in range(1, 200):  # 50 s of ticks; the collector lists /proc every 5 s from the second tick
        now[0] = step * tick
        procs.shared = [SERVICE.pid, SHIPPER.pid] if (step - 1) % int(SCAN_EVERY_S / tick) == 0 else None
        watch.refresh([], [SERVICE.pid])
    assert procs.listings == 1


def test_burstwatch_judges_a_new_exec_once_and_an_exec_in_place_again(tmp_path, monkeypatch):
    from remediator import burstwatch
    from remediator.burstwatch import BurstWatch

    source, procs = FakeBurstSource(), FakeProcs(SERVICE, SHIPPER)
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    judged: list[int] = []
    original = BurstWatch._judge
    monkeypatch.setattr(burstwatch.BurstWatch, "_judge", lambda self, info, protected: (judged.append(info.pid), original(self, info, protected)))
    # fork and exec: the tick's sample names the new process (read after its exec) and so does its exec event
    child = ProcessInfo(pid=401, start_time=41, comm="fluent-bit")
    procs.infos[child.pid] = child
    source.exec_pids = [child.pid]
    watch.refresh([SERVICE, SHIPPER, child], [SERVICE.pid])
    assert judged == [child.pid] and child.pid in source.candidates
    # an exec in place keeps (pid, start time): the sample's info alone would not judge it again
    judged.clear()
    procs.infos[child.pid] = ProcessInfo(pid=401, start_time=41, comm="sh")
    source.exec_pids = [child.pid]
    watch.refresh([SERVICE, SHIPPER, child], [SERVICE.pid])
    assert judged == [child.pid] and child.pid not in source.candidates


def test_burstwatch_judges_a_renamed_or_moved_process_again_within_the_tick(tmp_path, monkeypatch):
    """A rename (prctl) or a cgroup move keeps (pid, start time), so neither the sample nor a
    listing would judge the process again: the collector's task events name it, and it becomes a
    candidate, or stops being one, at that tick; a pid an exec named in the same tick is judged once."""
    from remediator import burstwatch
    from remediator.burstwatch import BurstWatch

    node = ProcessInfo(pid=500, start_time=50, comm="node")
    source, procs = FakeBurstSource(), FakeProcs(SERVICE, node)
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert node.pid not in source.candidates
    judged: list[int] = []
    original = BurstWatch._judge
    monkeypatch.setattr(burstwatch.BurstWatch, "_judge", lambda self, info, protected: (judged.append(info.pid), original(self, info, protected)))
    procs.infos[node.pid] = ProcessInfo(pid=500, start_time=50, comm="fluent-bit")  # process.title = "fluent-bit"
    watch.refresh([SERVICE], [SERVICE.pid])
    assert node.pid not in source.candidates and judged == []  # unseen without the event
    watch.refresh([SERVICE], [SERVICE.pid], changed={node.pid})
    assert node.pid in source.candidates and judged == [node.pid]
    judged.clear()
    procs.infos[node.pid] = ProcessInfo(pid=500, start_time=50, comm="worker")
    source.exec_pids = [node.pid]
    watch.refresh([SERVICE], [SERVICE.pid], changed={node.pid})
    assert node.pid not in source.candidates and judged == [node.pid]


def test_burstwatch_judges_a_flood_of_new_idle_pids_a_bounded_number_a_tick(tmp_path, monkeypatch):
    """A user forking thousands of idle processes: the listing's new pids are judged
    NEW_PIDS_PER_TICK_MAX a tick, oldest first, those gone meanwhile never read; a process that
    runs is named by the tick's sample and judged at once; readings kept for events age out."""
    from remediator import burstwatch
    from remediator.burstwatch import BurstWatch

    monkeypatch.setattr(burstwatch, "NEW_PIDS_PER_TICK_MAX", 3)
    idle = [ProcessInfo(pid=1000 + i, start_time=100 + i, comm="sleep") for i in range(8)]
    procs = FakeProcs(SERVICE, *idle)
    source, now = FakeBurstSource(), [0.0]
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: now[0])
    watch.set_policies(burst_policies(tmp_path))
    watch.refresh([], [SERVICE.pid])
    assert procs.reads == 3
    del procs.infos[idle[7].pid]  # exits before its turn comes
    procs.infos[SHIPPER.pid] = SHIPPER
    now[0] = 0.25
    watch.refresh([SHIPPER], [SERVICE.pid])  # it ran: judged at once, beside the next three
    assert procs.reads == 6 and SHIPPER.pid in source.candidates
    now[0] = burstwatch.OWN_SCAN_AFTER_S + 0.5
    watch.refresh([], [SERVICE.pid])  # the next listing drops the gone pid from the queue: never read
    assert procs.reads == 8 and not watch._unjudged
    assert SHIPPER.pid not in watch._judged_info  # judged 5 s ago: of no use to an event any more
    assert SHIPPER.pid in source.candidates


def test_a_full_candidate_map_leaves_out_the_longest_idle_not_the_shipper_that_runs(tmp_path, caplog):
    """A user's thousands of idle processes calling themselves fluent-bit are candidates by policy;
    more than the probe's map holds leaves out those the samples named longest ago, keeps room
    for the kernel's fork children, and says so once."""
    from remediator.burstwatch import BurstWatch

    look_alikes = [ProcessInfo(pid=2000 + i, start_time=200 + i, comm="fluent-bit") for i in range(10)]
    procs = FakeProcs(SERVICE, *look_alikes)
    source = FakeBurstSource()
    source.burst_capacity = 8  # room for 7: an eighth is left for fork children
    watch = BurstWatch(source, procs, daemon=None, clock=lambda: 0.0)
    watch.set_policies(burst_policies(tmp_path))
    with caplog.at_level("WARNING"):
        watch.refresh([], [SERVICE.pid])
    assert len(source.candidates) == 7 and watch.left_out == 3
    assert "burst candidate map is full: 3 processes" in caplog.text
    procs.infos[SHIPPER.pid] = SHIPPER
    watch.refresh([SHIPPER], [SERVICE.pid])  # the real shipper runs: named by the sample
    assert SHIPPER.pid in source.candidates and len(source.candidates) == 7 and watch.left_out == 4
    caplog.clear()
    with caplog.at_level("WARNING"):
        watch.refresh([look_alikes[0]], [SERVICE.pid])
    assert look_alikes[0].pid in source.candidates and SHIPPER.pid in source.candidates
    assert "map is full" not in caplog.text  # said once, while it stays full
