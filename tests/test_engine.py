"""The engine on synthetic Sample sequences, without a kernel: one test per behaviour."""

from __future__ import annotations

import pytest

from remediator import histogram
from remediator.engine import EngineSettings, EngineState, decide, export_state, import_state, record_outcome
from remediator.policy import load_policies
from remediator.procfs import ProcessInfo
from remediator.sample import ProcessUsage, ProtectedWaits, Sample

TICK = 0.25
SERVICE = ProcessInfo(pid=100, start_time=10, comm="api", exe="/usr/bin/api")
SHIPPER = ProcessInfo(pid=200, start_time=20, comm="fluent-bit", exe="/usr/bin/fluent-bit")
BYSTANDER = ProcessInfo(pid=300, start_time=30, comm="postgres", exe="/usr/bin/postgres")
SETTINGS = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10, self_pid=999,
                          self_start_time=5)  # remediator is (999, 5)

LADDER = """
[[policy]]
name = "shippers"
description = "test"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = {{ percentile = 99.0, above = "2ms", windows = {n}, of = {m} }}
offender = {offender}
[[policy.actions]]
nice = 10
settle = "1s"
[[policy.actions]]
affinity = "unprotected"
settle = "1s"
[policy.limits]
cooldown = "{cooldown}"
max_actions_per_hour = {hourly}
revert_after_quiet = "{quiet}"
min_cpus = 1
"""


def policies(tmp_path, n=3, m=5, offender='{ cpu = 0.5, cpu_kind = "peak", blame_share = 0.2, require = "all" }',
             cooldown="10s", hourly=6, quiet="5s", text=None):
    path = tmp_path / "p.toml"
    path.write_text(text or LADDER.format(n=n, m=m, offender=offender, cooldown=cooldown, hourly=hourly, quiet=quiet))
    return load_policies([path])


def sample(t, tail_us=100.0, shipper_cpu=0.0, shipper_peak=None, blame_ns=0, processes=(SERVICE, SHIPPER), protected=(100,),
           over=4, base=200):
    """One tick ending at t (seconds): `base` waits at 50 us plus `over` at `tail_us` (so p99 ~ tail_us)."""
    waits = [50_000] * base + [int(tail_us * 1000)] * over
    counts = histogram.from_values(waits)
    duration_ns = int(TICK * 1e9)
    usage = []
    if shipper_cpu or shipper_peak:
        peak = shipper_peak if shipper_peak is not None else shipper_cpu
        usage.append(ProcessUsage(SHIPPER.pid, SHIPPER.comm, int(shipper_cpu * duration_ns), int(peak * 50_000_000), False))
    wait_ns = sum(waits)
    return Sample(
        ts=1_700_000_000 + t,
        start_ns=int((t - TICK) * 1e9),
        end_ns=int(t * 1e9),
        source="bpf",
        window_ns=50_000_000,
        ncpus=2,
        protected=ProtectedWaits(threads=2, pids=tuple(protected), waits=len(waits), wakeups=len(waits), preemptions=0,
                                 wait_ns=wait_ns, max_ns=max(waits), histogram=tuple(sorted(counts.items()))),
        usage=tuple(usage),
        blame=((SHIPPER.pid, blame_ns),) if blame_ns else (),
        cpu_busy_ns=(duration_ns, duration_ns),
        processes={info.pid: info for info in processes},
    )


def run(policy_set, samples, outcome="applied", settings=SETTINGS, state=None):
    """Feed samples in order; every act/revert gets `outcome`. Returns (state, decisions by tick)."""
    state = state or EngineState()
    per_tick = []
    for s in samples:
        state, decisions = decide(state, s, policy_set, settings)
        for decision in decisions:
            if decision.kind in ("act", "revert"):
                status = outcome if decision.kind == "act" else "restored"
                state = record_outcome(state, decision, status, policy_set)
        per_tick.append(decisions)
    return state, per_tick


def kinds(per_tick):
    return [(i, d.kind, d.step_index) for i, decisions in enumerate(per_tick) for d in decisions]


def hot(t, over=4, **kw):
    """The shipper busy and blamed for the long waits (at least 20 ms of them: 4 of 5 ms)."""
    return sample(t, tail_us=5000, shipper_cpu=1.8, blame_ns=max(20_000_000, over * 5_000_000), over=over, **kw)


def test_nothing_happens_while_the_tail_is_fine(tmp_path):
    _, per_tick = run(policies(tmp_path), [sample(TICK * i, tail_us=500, shipper_cpu=1.9, blame_ns=900_000) for i in range(1, 20)])
    assert kinds(per_tick) == []


def test_needs_n_of_the_last_m_windows(tmp_path):
    p = policies(tmp_path, n=3, m=5)
    ticks = [hot(TICK), sample(2 * TICK), hot(3 * TICK), sample(4 * TICK), hot(5 * TICK)]
    _, per_tick = run(p, ticks)
    assert kinds(per_tick) == [(4, "act", 0)]
    act = per_tick[4][0]
    assert act.request.kind == "nice" and act.request.params == {"nice": 10} and act.request.identity == SHIPPER.identity
    assert act.evidence["protected_tail"]["windows_over"] == 3
    assert act.evidence["protected_tail"]["threshold_us"] == 2000


def test_never_acts_on_a_process_no_policy_names(tmp_path):
    bystander_hot = sample(TICK, tail_us=5000, processes=(SERVICE, BYSTANDER))
    s = []
    for i in range(1, 10):
        base = sample(TICK * i, tail_us=5000, processes=(SERVICE, BYSTANDER))
        s.append(base.__class__(**{**base.__dict__, "usage": (ProcessUsage(300, "postgres", 400_000_000, 50_000_000),),
                                    "blame": ((300, 900_000),)}))
    _, per_tick = run(policies(tmp_path, n=1, m=1), s)
    assert kinds(per_tick) == []
    assert bystander_hot.processes[300].comm == "postgres"


@pytest.mark.parametrize("info, reason", [
    (ProcessInfo(pid=1, start_time=1, comm="fluent-bit"), "PID 1"),
    (ProcessInfo(pid=200, start_time=20, comm="fluent-bit", kernel_thread=True), "kernel thread"),
    (ProcessInfo(pid=999, start_time=5, comm="fluent-bit"), "remediator itself"),
    (ProcessInfo(pid=200, start_time=20, comm="fluent-bit"), "protected service"),
])
def test_safety_exclusions_win_over_policies(tmp_path, info, reason):
    protected = (100, 200) if reason == "protected service" else (100,)
    s = []
    for i in range(1, 6):
        base = sample(TICK * i, tail_us=5000, processes=(SERVICE, info), protected=protected)
        s.append(base.__class__(**{**base.__dict__, "usage": (ProcessUsage(info.pid, info.comm, 400_000_000, 50_000_000),),
                                    "blame": ((info.pid, 900_000),)}))
    _, per_tick = run(policies(tmp_path, n=1, m=1), s)
    assert [k for _, k, _ in kinds(per_tick)] == ["excluded"]  # said once, never acted on
    assert reason in per_tick[0][0].message


def test_offender_conditions_peak_mean_blame_any_all(tmp_path):
    burst = lambda t: sample(t, tail_us=5000, shipper_cpu=0.2, shipper_peak=1.5)  # noqa: E731
    _, per_tick = run(policies(tmp_path, n=1, m=1, offender='{ cpu = 1.0, cpu_kind = "peak" }'), [burst(TICK)])
    assert kinds(per_tick) == [(0, "act", 0)]  # the burst peak shows what the mean hides
    _, per_tick = run(policies(tmp_path, n=1, m=1, offender='{ cpu = 1.0, cpu_kind = "mean" }'), [burst(TICK)])
    assert kinds(per_tick) == []
    blamed = sample(TICK, tail_us=5000, shipper_cpu=0.1, blame_ns=12_000_000)  # 40% of the 30 ms waited
    _, per_tick = run(policies(tmp_path, n=1, m=1, offender='{ cpu = 1.0, blame_share = 0.2, require = "any" }'), [blamed])
    assert kinds(per_tick) == [(0, "act", 0)]
    _, per_tick = run(policies(tmp_path, n=1, m=1, offender='{ cpu = 1.0, blame_share = 0.2, require = "all" }'), [blamed])
    assert kinds(per_tick) == []


def test_ladder_advances_only_after_settle_and_while_the_trigger_holds(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    # act at 0.25 s; settle is 1 s: no step 2 before 1.25 s
    ticks = [hot(TICK * i) for i in range(1, 5)] + [hot(TICK * 5)]
    _, per_tick = run(p, ticks)
    assert [k for k in kinds(per_tick) if k[1] == "act"] == [(0, "act", 0), (4, "act", 1)]
    step_two = [d for d in per_tick[4] if d.kind == "act"][0]
    assert step_two.request.kind == "affinity" and step_two.request.params == {"cpus": [1]}
    # the trigger stopped holding after step 1: no escalation
    _, per_tick = run(p, [hot(TICK)] + [sample(TICK * i) for i in range(2, 12)])
    assert [k for _, k, _ in kinds(per_tick) if k == "act"] == ["act"]


def test_last_step_then_a_single_warning(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    _, per_tick = run(p, [hot(TICK * i) for i in range(1, 30)])
    found = [(i, k) for i, k, _ in kinds(per_tick) if k != "verify"]
    # step 1 at tick 0, step 2 after its 1 s settle (tick 4), then one warning after step 2 settled (tick 8)
    assert found == [(0, "act"), (4, "act"), (8, "exhausted")]


def test_hourly_cap_per_process(tmp_path):
    p = policies(tmp_path, n=1, m=1, hourly=1)
    _, per_tick = run(p, [hot(TICK * i) for i in range(1, 12)])
    assert [k for _, k, _ in kinds(per_tick) if k in ("act", "capped")] == ["act", "capped"]


def test_global_cap_per_minute(tmp_path):
    tight = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=1, self_pid=999)
    _, per_tick = run(policies(tmp_path, n=1, m=1), [hot(TICK * i) for i in range(1, 12)], settings=tight)
    acts = [k for _, k, _ in kinds(per_tick) if k in ("act", "capped")]
    assert acts[0] == "act" and "act" not in acts[1:] and "capped" in acts


def test_revert_after_quiet_then_cooldown(tmp_path):
    p = policies(tmp_path, n=1, m=1, quiet="2s", cooldown="3s")
    ticks = [hot(TICK)] + [sample(TICK * i) for i in range(2, 14)] + [hot(TICK * i) for i in range(14, 30)]
    _, per_tick = run(p, ticks)
    found = [(i, k) for i, k, _ in kinds(per_tick) if k in ("act", "revert")]
    # act at tick 0; quiet from 0.25 s, revert at >= 2.25 s (tick 8); cooldown 3 s: no act before 5.25 s (tick 20)
    assert found[0] == (0, "act")
    assert found[1] == (8, "revert")
    assert found[2][1] == "act" and found[2][0] >= 20
    assert per_tick[8][0].identity == SHIPPER.identity


def test_a_failed_revert_is_retried_after_another_quiet_period_not_every_tick(tmp_path):
    p = policies(tmp_path, n=1, m=1, quiet="2s")
    state, per_tick = run(p, [hot(TICK)])
    reverts = []
    for i in range(2, 30):
        state, decisions = decide(state, sample(TICK * i), p, SETTINGS)
        for decision in decisions:
            if decision.kind == "revert":
                reverts.append(i)
                state = record_outcome(state, decision, "denied", p)
    # quiet from 0.25 s: first try at 2.25 s (tick 9), then every 2 s (8 ticks), not every tick
    assert reverts == [9, 17, 25]


def bad_tail(t, over):
    """A tick with `over` of 200 + over waits at 5 ms (over the 2 ms threshold) and the shipper idle: no trigger."""
    return sample(t, tail_us=5000, over=over)


def verifications(per_tick):
    return [(i, d) for i, decisions in enumerate(per_tick) for d in decisions if d.kind == "verify"]


def test_verification_says_helped_when_the_rate_over_the_threshold_falls_beyond_the_noise(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    before = [bad_tail(TICK * i, 40) for i in range(1, 5)]  # the settle (1 s) before the step: 4 windows, its own the last
    after = [sample(TICK * i, tail_us=5000, over=2) for i in range(6, 12)]
    _, per_tick = run(p, before + [hot(TICK * 5, over=40)] + after)
    (_, verify), = verifications(per_tick)
    assert verify.evidence["verdict"] == "helped" and "helped" in verify.message
    assert verify.action_id == [d for d in per_tick[4] if d.kind == "act"][0].action_id
    assert verify.evidence["before"] == {"windows": 4, "waits": 960, "over": 160, "rate": 0.166667}
    assert verify.evidence["after"]["windows"] == 4 and verify.evidence["after"]["over"] == 8
    low, high = verify.evidence["rate_ratio_interval"]
    assert high < 0.8 and verify.evidence["p_reduced"] < 0.05


def test_verification_says_did_not_help_when_the_rate_stays_within_a_fifth_for_sure(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    before = [bad_tail(TICK * i, 60) for i in range(1, 5)]
    _, per_tick = run(p, before + [hot(TICK * 5, over=60)] + [bad_tail(TICK * i, 60) for i in range(6, 12)])
    (_, verify), = verifications(per_tick)
    assert verify.evidence["verdict"] == "did-not-help" and "did not help" in verify.message
    assert verify.evidence["rate_ratio_interval"][0] > 0.8


def test_a_verification_within_the_noise_is_judged_again_then_stays_inconclusive(tmp_path):
    """A 10% fall of a noisy rate: the old fixed 0.9 ratio of two p99s called this 'helped'."""
    p = policies(tmp_path, n=1, m=1)
    noisy = [30, 50, 20, 60]
    before = [bad_tail(TICK * i, over) for i, over in enumerate(noisy, 1)]
    after = [bad_tail(TICK * i, round(noisy[i % 4] * 0.9)) for i in range(6, 20)]
    _, per_tick = run(p, before + [hot(TICK * 5)] + after)
    (index, verify), = verifications(per_tick)
    assert verify.evidence["verdict"] == "inconclusive" and "within the noise" in verify.message
    assert verify.evidence["reverified"] == 2 and verify.evidence["window_s"] == 3.0  # 3 settle periods after
    assert index == 4 + 12  # the step at tick 4, its verdict 3 s (12 ticks) later
    assert verify.evidence["dispersion"] > 1.0


def test_few_waits_are_inconclusive(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    few = [sample(TICK * i, tail_us=5000, over=1, base=8) for i in range(1, 5)]
    after = [sample(TICK * i, tail_us=5000, over=i % 2, base=8) for i in range(6, 20)]
    _, per_tick = run(p, few + [hot(TICK * 5)] + after)
    (_, verify), = verifications(per_tick)
    assert verify.evidence["verdict"] == "inconclusive"


def test_a_verification_needs_windows_before_the_step(tmp_path):
    _, per_tick = run(policies(tmp_path, n=1, m=1), [hot(TICK)] + [sample(TICK * i) for i in range(2, 16)])
    (_, verify), = verifications(per_tick)
    assert verify.evidence["verdict"] == "inconclusive" and "1 window(s) with protected waits before" in verify.message


def test_an_inconclusive_verification_never_holds_the_ladder_back(tmp_path):
    """The next step comes when its settle ends and the trigger holds, as without verification; it
    ends the after-period of the step before, whose verdict follows a tick later."""
    p = policies(tmp_path, n=1, m=1)
    _, per_tick = run(p, [hot(TICK * i) for i in range(1, 12)])
    found = kinds(per_tick)
    assert [(i, k) for i, k, _ in found if k == "act"] == [(0, "act"), (4, "act")]
    (index, verify), = [(i, d) for i, d in verifications(per_tick) if d.step_index == 0]
    assert index == 5 and verify.evidence["window_s"] == 1.0 and verify.evidence["after_cut_by"]


def test_always_places_with_the_whole_ladder_once(tmp_path):
    text = LADDER.format(n=1, m=1, offender="{ cpu = 1.0 }", cooldown="1s", hourly=6, quiet="never")
    text = text.replace('tail = { percentile = 99.0, above = "2ms", windows = 1, of = 1 }\noffender = { cpu = 1.0 }', "always = true")
    p = policies(tmp_path, text=text)
    state = EngineState()
    state, decisions = decide(state, sample(TICK), p, SETTINGS, discovered=[SHIPPER])
    assert [(d.kind, d.step_index) for d in decisions] == [("act", 0), ("act", 1)]
    for d in decisions:
        state = record_outcome(state, d, "applied", p)
    state, decisions = decide(state, sample(2 * TICK), p, SETTINGS, discovered=[SHIPPER])
    assert decisions == []


def test_unprotected_with_no_cpus_left_is_infeasible_not_pretended(tmp_path):
    all_owned = EngineSettings(request_cpus=frozenset({0, 1}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10, self_pid=999,
                          self_start_time=5)  # remediator is (999, 5)
    _, per_tick = run(policies(tmp_path, n=1, m=1), [hot(TICK * i) for i in range(1, 12)], settings=all_owned)
    found = [k for _, k, _ in kinds(per_tick) if k != "verify"]
    assert found == ["act", "infeasible"]  # nice, then affinity cannot leave the offender any CPU
    infeasible = [d for decisions in per_tick for d in decisions if d.kind == "infeasible"][0]
    assert "0 CPU" in infeasible.message


def test_a_gone_process_is_forgotten(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    state, _ = run(p, [hot(TICK)], outcome="gone")
    assert state.remediations == {}


def test_a_failed_step_counts_as_tried(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    state, per_tick = run(p, [hot(TICK * i) for i in range(1, 7)], outcome="denied")
    assert [k for k in kinds(per_tick) if k[1] == "act"] == [(0, "act", 0), (4, "act", 1)]
    assert not any(r.applied for r in state.remediations.values())


def test_same_samples_same_decisions(tmp_path):
    p = policies(tmp_path, n=2, m=3)
    ticks = [hot(TICK * i) if i % 3 else sample(TICK * i) for i in range(1, 40)]
    first = [[(d.kind, d.step_index, d.message) for d in t] for t in run(p, ticks)[1]]
    second = [[(d.kind, d.step_index, d.message) for d in t] for t in run(p, ticks)[1]]
    assert first == second and any(first)


def in_groups(service_group, shipper_group):
    import dataclasses

    return (dataclasses.replace(SERVICE, sched_group=service_group), dataclasses.replace(SHIPPER, sched_group=shipper_group))


def test_a_nice_step_that_cannot_reach_the_service_is_skipped_at_once(tmp_path):
    """Different sessions (autogroups): nice weighs nothing between them, so the ladder goes on to
    affinity in the same tick instead of spending the settle period on nice."""
    p = policies(tmp_path, n=1, m=1)
    groups = in_groups("autogroup-4", "autogroup-9")
    _, per_tick = run(p, [hot(TICK * i, processes=groups) for i in range(1, 8)])
    assert [(i, k, s) for i, k, s in kinds(per_tick) if k != "verify"] == [(0, "skipped", 0), (0, "act", 1), (4, "exhausted", 1)]
    skipped = per_tick[0][0]
    assert "nice 10 cannot work on this host" in skipped.message and "fluent-bit (200) is in autogroup-9" in skipped.message
    assert skipped.evidence["sched_groups"] == {"offender": "autogroup-9", "protected": {"100": "autogroup-4"}}
    assert per_tick[0][1].request.kind == "affinity"


@pytest.mark.parametrize("service, shipper", [("autogroup-4", "autogroup-4"), ("/system.slice/api.service", "/"), ("", "autogroup-9")])
def test_a_nice_step_is_taken_where_it_can_work_or_where_that_is_unknown(tmp_path, service, shipper):
    _, per_tick = run(policies(tmp_path, n=1, m=1), [hot(TICK, processes=in_groups(service, shipper))])
    assert [(d.kind, d.request.kind) for d in per_tick[0]] == [("act", "nice")]


def test_a_ladder_of_steps_that_cannot_work_says_so_once(tmp_path):
    text = LADDER.format(n=1, m=1, offender='{ cpu = 0.5 }', cooldown="10s", hourly=6, quiet="5s")
    text = text.replace('affinity = "unprotected"', 'sched = "idle"')
    groups = in_groups("/system.slice/api.service", "/system.slice/ship.service")
    state, per_tick = run(policies(tmp_path, text=text), [hot(TICK * i, processes=groups) for i in range(1, 10)])
    assert kinds(per_tick) == [(0, "skipped", 0), (0, "skipped", 1), (0, "exhausted", None)]
    assert "no step of the ladder can work" in per_tick[0][2].message
    assert not state.active()


PLACEMENT = """
[[policy]]
name = "maintenance"
description = "test"
[policy.match]
comm = ["updatedb"]
[policy.trigger]
always = true
[[policy.actions]]
nice = 19
settle = "1s"
[policy.limits]
cooldown = "1s"
max_actions_per_hour = 6
revert_after_quiet = "never"
min_cpus = 1
"""


def test_a_users_execs_under_an_always_policy_never_spend_the_remediations_budget(tmp_path):
    """Anyone can exec a program named like one a placement policy names (`cp /bin/sleep ~/updatedb`),
    a dozen a minute; those placements are capped per user and leave the host's budget alone."""
    path = tmp_path / "p.toml"
    path.write_text(LADDER.format(n=1, m=1, offender='{ cpu = 0.5, cpu_kind = "peak", blame_share = 0.2, require = "all" }',
                                  cooldown="10s", hourly=6, quiet="5s") + PLACEMENT)
    p = load_policies([path])
    state, seen = EngineState(), []
    for i in range(12):  # twelve execs by uid 1000 within the minute, as many as the cap and more
        hostile = ProcessInfo(pid=5000 + i, start_time=500 + i, comm="updatedb", uid=1000)
        state, decisions = decide(state, sample(TICK * (i + 1)), p, SETTINGS, discovered=[hostile])
        for d in decisions:
            seen.append(d)
            if d.kind == "act":
                state = record_outcome(state, d, "unchanged", p)  # pre-set to nice 19: nothing even changes
    assert [d.kind for d in seen] == ["act"] * 10 + ["capped"]  # said once: the second time is counted, not said
    assert "placements of uid 1000" in seen[-1].message
    # The real shipper still gets its step, and root's own updatedb its placement.
    state, decisions = decide(state, hot(TICK * 13), p, SETTINGS,
                              discovered=[ProcessInfo(pid=6000, start_time=600, comm="updatedb", uid=0)])
    assert sorted((d.kind, d.info.comm) for d in decisions) == [("act", "fluent-bit"), ("act", "updatedb")]


def test_a_cap_that_holds_hundreds_of_times_a_minute_is_said_once_a_minute_with_the_count(tmp_path):
    """Execs of look-alikes by the hundred a second: a "capped" decision (an audit line, a log
    warning) for each would fill the disk; one a minute per user and policy says how many."""
    path = tmp_path / "p.toml"
    path.write_text(PLACEMENT)
    p = load_policies([path])
    state, capped = EngineState(), []
    for i in range(600):  # 100 execs a tick for 6 ticks... then on, over 150 s
        now = TICK * (i // 100 + 1) + 60.0 * (i // 200)
        hostile = ProcessInfo(pid=5000 + i, start_time=500 + i, comm="updatedb", uid=1000)
        state, decisions = decide(state, sample(now), p, SETTINGS, discovered=[hostile])
        for d in decisions:
            if d.kind == "act":
                state = record_outcome(state, d, "applied", p)
            elif d.kind == "capped":
                capped.append(d.message)
    assert len(capped) == 3, capped
    assert "held" not in capped[0]
    assert all("more times for uid 1000 and this policy since it was last said" in message for message in capped[1:]), capped


def test_the_placements_budget_survives_a_restart(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PLACEMENT)
    p = load_policies([path])
    state = EngineState()
    for i in range(10):
        state, decisions = decide(state, sample(TICK * (i + 1)), p, SETTINGS,
                                  discovered=[ProcessInfo(pid=5000 + i, start_time=500 + i, comm="updatedb", uid=1000)])
        for d in decisions:
            state = record_outcome(state, d, "applied", p)
    restored = import_state(export_state(state))
    assert restored.recent_placements == state.recent_placements and len(restored.recent_placements) == 10
    _, decisions = decide(restored, sample(TICK * 11), p, SETTINGS,
                          discovered=[ProcessInfo(pid=5100, start_time=600, comm="updatedb", uid=1000)])
    assert [d.kind for d in decisions] == ["capped"]
