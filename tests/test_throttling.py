"""Own-quota throttling of the protected service: cpu.stat read from a fake cgroupfs (v1 and v2),
carried in the Sample, and the engine refusing to act on a neighbour when it explains the tail."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from remediator import histogram
from remediator.cgroupfs import CgroupFS, CgroupMount
from remediator.engine import EngineSettings, EngineState, decide, record_outcome
from remediator.policy import load_policies
from remediator.procfs import ProcessInfo, ProcFS
from remediator.sample import ProcessUsage, ProtectedWaits, Sample, Throttling, merge_samples
from remediator.throttling import ThrottleReader, parse_cpu_stat

V1_STAT = "nr_periods {p}\nnr_throttled {t}\nthrottled_time {ns}\nnr_bursts 0\nburst_time 0\n"
V2_STAT = "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods {p}\nnr_throttled {t}\nthrottled_usec {us}\n"


def test_parse_cpu_stat_v1_and_v2():
    v1 = parse_cpu_stat(V1_STAT.format(p=10, t=4, ns=7_000_000))
    v2 = parse_cpu_stat(V2_STAT.format(p=10, t=4, us=7_000))
    assert v1 == v2 and v1.throttled_ns == 7_000_000 and v1.throttled_periods == 4
    assert parse_cpu_stat("usage_usec 5\n") is None  # the root of v2 has no throttling counters


def fake_host(tmp_path: Path, version: int, cgroup: str = "/api.slice/api.service"):
    proc = tmp_path / "proc"
    (proc / "100").mkdir(parents=True)
    line = f"0::{cgroup}" if version == 2 else f"4:cpu,cpuacct:{cgroup}\n1:name=systemd:/x"
    (proc / "100" / "cgroup").write_text(line + "\n")
    mount_point = tmp_path / "cgroup"
    for path in ("api.slice", "api.slice/api.service"):
        (mount_point / path).mkdir(parents=True, exist_ok=True)
    mount = CgroupMount(version, mount_point, "/", frozenset({"cpu"} if version == 1 else {"cpu", "cpuset"}))
    return ThrottleReader(ProcFS(proc), CgroupFS(), mount), mount_point


def write_stat(directory: Path, version: int, periods: int, throttled: int, ns: int) -> None:
    text = V1_STAT.format(p=periods, t=throttled, ns=ns) if version == 1 else V2_STAT.format(p=periods, t=throttled, us=ns // 1000)
    (directory / "cpu.stat").write_text(text)


def test_reader_reports_differences_per_tick_v1(tmp_path):
    reader, root = fake_host(tmp_path, 1)
    service, slice_ = root / "api.slice/api.service", root / "api.slice"
    write_stat(service, 1, 100, 10, 50_000_000)
    write_stat(slice_, 1, 100, 0, 0)
    first = reader.read([100])
    assert first == Throttling(("/api.slice/api.service",), 0, 0, 0)  # a first read has nothing to compare with
    write_stat(service, 1, 110, 16, 80_000_000)
    assert reader.read([100]) == Throttling(("/api.slice/api.service",), 10, 6, 30_000_000)


def test_a_quota_on_the_parent_slice_counts_once_v2(tmp_path):
    reader, root = fake_host(tmp_path, 2)
    service, slice_ = root / "api.slice/api.service", root / "api.slice"
    write_stat(service, 2, 0, 0, 0)
    write_stat(slice_, 2, 100, 0, 0)
    reader.read([100])
    write_stat(slice_, 2, 120, 9, 40_000_000)  # the slice's cpu.max throttles everything below it
    assert reader.read([100]) == Throttling(("/api.slice/api.service",), 20, 9, 40_000_000)


def test_no_cgroup_and_gone_processes_give_none(tmp_path):
    reader, _ = fake_host(tmp_path, 2, cgroup="/")
    assert reader.read([100]) is None
    assert reader.read([4242]) is None  # no such process


def test_a_move_to_another_cgroup_is_seen_once_the_kept_path_is_due(tmp_path):
    from remediator.throttling import PATHS_KEPT_S

    reader, root = fake_host(tmp_path, 2)
    now = [0.0]
    reader.clock = lambda: now[0]
    (root / "batch.slice").mkdir()
    for directory in (root / "api.slice/api.service", root / "api.slice", root / "batch.slice"):
        write_stat(directory, 2, 0, 0, 0)
    assert reader.read([100]).cgroups == ("/api.slice/api.service",)
    (tmp_path / "proc/100/cgroup").write_text("0::/batch.slice\n")  # moved, without an exec
    now[0] += PATHS_KEPT_S / 2
    assert reader.read([100]).cgroups == ("/api.slice/api.service",)  # kept: not read every tick
    now[0] += PATHS_KEPT_S
    assert reader.read([100]).cgroups == ("/batch.slice",)
    reader.read([])  # no longer protected: forgotten, and read afresh when it is again
    (tmp_path / "proc/100/cgroup").write_text("0::/api.slice/api.service\n")
    assert reader.read([100]).cgroups == ("/api.slice/api.service",)


def test_old_recordings_without_throttling_still_read_and_merge():
    s = sample(1.0, throttled_ns=None)
    data = s.to_json()
    del data["throttling"]
    assert Sample.from_json(data).throttling is None
    t = sample(1.0, throttled_ns=5_000_000)
    assert Sample.from_json(t.to_json()) == t
    merged = merge_samples([sample(1.0, throttled_ns=5_000_000), sample(1.25, throttled_ns=None), sample(1.5, throttled_ns=1_000_000)])
    assert merged.throttling is not None and merged.throttling.throttled_ns == 6_000_000


# -- the engine ------------------------------------------------------------------------------------

TICK = 0.25
SERVICE = ProcessInfo(pid=100, start_time=10, comm="api")
SHIPPER = ProcessInfo(pid=200, start_time=20, comm="fluent-bit")
SETTINGS = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=30, self_pid=999)
POLICY = """
[[policy]]
name = "shippers"
description = "test"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { above = "2ms", windows = 2, of = 3 }
offender = { cpu = 0.5 }
[[policy.actions]]
nice = 10
"""


def sample(t, tail_us=5000.0, shipper_cpu=0.8, blame_ns=2_000_000, throttled_ns=None, own_ns=0, blame=None):
    """One tick: 200 short waits and 4 of `tail_us`. The probe's split: `own_ns` behind the service's
    own threads, `blame_ns` behind the shipper (all the blame on others), the rest behind nobody
    (an idle CPU, as while a throttled group may not run). `blame`: the blame list, when it says more
    than the split (a forked worker of the service, which the probe counts as its own)."""
    waits = [50_000] * 200 + [int(tail_us * 1000)] * 4
    assert own_ns + blame_ns <= sum(waits) and (throttled_ns or 0) <= 4 * tail_us * 1000, "a tick the kernel cannot give"
    duration_ns = int(TICK * 1e9)
    return Sample(
        ts=1_700_000_000 + t, start_ns=int((t - TICK) * 1e9), end_ns=int(t * 1e9), source="bpf", window_ns=50_000_000, ncpus=2,
        protected=ProtectedWaits(threads=1, pids=(100,), waits=len(waits), wakeups=len(waits), preemptions=0, wait_ns=sum(waits),
                                 max_ns=max(waits), histogram=tuple(sorted(histogram.from_values(waits).items())),
                                 blamed_ns=blame_ns, own_ns=own_ns, unattributed_ns=sum(waits) - blame_ns - own_ns),
        usage=(ProcessUsage(200, "fluent-bit", int(shipper_cpu * duration_ns), None),),
        blame=blame if blame is not None else ((200, blame_ns),) if blame_ns else (),
        cpu_busy_ns=(duration_ns, duration_ns), processes={100: SERVICE, 200: SHIPPER},
        throttling=None if throttled_ns is None else Throttling(("/api",), 25, 10 if throttled_ns else 0, throttled_ns),
    )


def run(tmp_path, samples):
    path = tmp_path / "p.toml"
    path.write_text(POLICY)
    policies = load_policies([path])
    state, out = EngineState(), []
    for s in samples:
        state, decisions = decide(state, s, policies, SETTINGS)
        for decision in decisions:
            if decision.kind == "act":
                state = record_outcome(state, decision, "applied", policies)
        out += decisions
    return out


def test_a_self_throttled_tail_is_not_acted_on_and_is_audited_once(tmp_path):
    # Each tick: throttled 40 ms, in 4 waits of 10 ms; the shipper ran 2 ms of the 50 ms waited.
    decisions = run(tmp_path, [sample(1.0 + i * TICK, tail_us=10_000.0, throttled_ns=40_000_000) for i in range(8)])
    assert [d.kind for d in decisions] == ["skipped"]
    skipped = decisions[0]
    assert skipped.message.startswith("self-inflicted: ")
    assert skipped.evidence["skipped"] == "self-inflicted"
    # At the second tick (the trigger needs 2 windows of its M = 3): 2 x 40 ms throttled, 2 x 2 ms
    # behind the shipper, 2 x (200 x 50 us + 4 x 10 ms) waited.
    assert skipped.evidence["protected_throttling"] == {"throttled_ns": 80_000_000, "throttled_periods": 20,
                                                        "behind_others_ns": 4_000_000, "wait_ns": 100_000_000}
    assert "throttled by its own CPU quota for 80.0 ms (20 periods), at least as long as others ran while it waited (4.0 ms)" \
        in skipped.message


def test_throttling_smaller_than_the_neighbours_share_does_not_stop_the_action(tmp_path):
    # 1 ms throttled a tick, 30 ms behind the shipper (of 50 ms waited): the neighbour is the harm.
    decisions = run(tmp_path, [sample(1.0 + i * TICK, tail_us=10_000.0, blame_ns=30_000_000, throttled_ns=1_000_000)
                               for i in range(3)])
    acts = [d for d in decisions if d.kind == "act"]
    assert len(acts) == 1
    assert acts[0].evidence["protected_throttling"] == {"throttled_ns": 2_000_000, "throttled_periods": 20,
                                                        "behind_others_ns": 60_000_000, "wait_ns": 100_000_000}


def test_wait_behind_the_services_own_workers_is_not_set_against_its_throttling(tmp_path):
    """The probe counts a worker the service forked (pid 300, in no protected pid list yet) as its
    own: 30 ms a tick behind it and 2 ms behind the shipper, throttled 10 ms. Others ran 2 ms, so
    the quota explains the tail; summed from the blame list instead, 'others' would be 32 ms."""
    blame = ((300, 30_000_000), (200, 2_000_000))
    decisions = run(tmp_path, [sample(1.0 + i * TICK, tail_us=10_000.0, own_ns=30_000_000, blame=blame,
                                      throttled_ns=10_000_000) for i in range(3)])
    assert [d.kind for d in decisions] == ["skipped"]
    assert decisions[0].evidence["protected_throttling"]["behind_others_ns"] == 4_000_000


def test_no_throttling_measured_acts_as_before(tmp_path):
    for throttled in (None, 0):
        decisions = run(tmp_path, [sample(1.0 + i * TICK, throttled_ns=throttled) for i in range(3)])
        assert [d.kind for d in decisions] == ["act"]


def test_the_skip_is_audited_again_after_a_minute(tmp_path):
    samples = [sample(1.0 + i * TICK, tail_us=10_000.0, throttled_ns=40_000_000) for i in range(8)]
    later = [dataclasses.replace(s, start_ns=s.start_ns + 61_000_000_000, end_ns=s.end_ns + 61_000_000_000) for s in samples]
    assert [d.kind for d in run(tmp_path, samples + later)] == ["skipped", "skipped"]


def test_watch_shows_the_throttling():
    from remediator.view import interval_view, render_text

    s = sample(1.0, tail_us=10_000.0, throttled_ns=40_000_000)
    view = interval_view(s)
    assert view["protected"]["throttled"] == {"cgroups": ["/api"], "periods": 25, "throttled_periods": 10, "throttled_us": 40000.0}
    assert "throttled by its own CPU quota: 40.0 ms in 10 of 25 periods (/api)" in render_text(view, s)
    assert interval_view(sample(1.0))["protected"]["throttled"] is None
