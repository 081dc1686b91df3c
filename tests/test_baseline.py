"""The service's own quiet baseline (remediator/baseline.py) and triggers relative to it, in the
engine, on synthetic samples: what is learned from, when it counts, and what bounds it."""

from __future__ import annotations

from remediator import baseline, histogram
from remediator.baseline import Baselines
from remediator.engine import EngineState, decide, export_state, import_state

from test_engine import LADDER, SETTINGS, TICK, kinds, policies, run, sample

# The engine tests' ladder, with its tail relative to the baseline.
RELATIVE = LADDER.replace('above = "2ms"', 'above = "5x baseline", at_least = "{at_least}", at_most = "2ms"')


def relative(tmp_path, at_least="200us", quiet="10m"):
    text = RELATIVE.format(n=2, m=4, offender='{ cpu = 0.5, cpu_kind = "peak", blame_share = 0.2 }', cooldown="60s", hourly=6,
                           quiet=quiet, at_least=at_least)
    return policies(tmp_path, text=text)


def quiet_windows(start, count, tail_us=100.0):
    return [sample(TICK * (start + i), tail_us=tail_us) for i in range(count)]


def harmful(start, count, tail_us):
    """The shipper on the service's CPU, holding its p99 at `tail_us`, with most of the blame."""
    return [sample(TICK * (start + i), tail_us=tail_us, shipper_cpu=0.9, blame_ns=20_000_000) for i in range(count)]


def counts(tail_us, waits=204):
    values = [50_000] * (waits - 4) + [int(tail_us * 1000)] * 4
    return histogram.from_values(values)


def learn(windows, threshold_us=2000.0):
    learned, now = Baselines(), 0.0
    for tail_us in windows:
        now += TICK
        learned = learned.learn({99.0: threshold_us}, counts(tail_us), TICK, now)
    return learned, now


def test_not_learned_until_enough_quiet_time():
    needed = int(baseline.MIN_BLOCKS * baseline.BLOCK_S / TICK)
    learned, now = learn([100.0] * (needed - 1))
    assert learned.value_us(99.0, now) is None
    learned, now = learn([100.0] * needed)
    assert 90 <= learned.value_us(99.0, now) <= 110


def test_a_median_of_blocks_so_a_few_odd_blocks_do_not_move_it():
    per_block = int(baseline.BLOCK_S / TICK)
    # Four blocks at 100 us and three blocks at 1.5 ms (under the 2 ms threshold, so quiet).
    learned, now = learn([100.0] * per_block * 4 + [1500.0] * per_block * 3)
    assert 90 <= learned.value_us(99.0, now) <= 110


def test_windows_over_the_threshold_or_with_few_waits_are_not_learned_from():
    learned, now = learn([5000.0] * 40)
    assert learned.value_us(99.0, now) is None
    few = Baselines()
    for i in range(1, 41):
        few = few.learn({99.0: 2000.0}, counts(100.0, waits=baseline.MIN_WAITS - 1), TICK, i * TICK)
    assert few.by_percentile == {}


def test_blocks_too_old_no_longer_count():
    learned, now = learn([100.0] * 40)
    assert learned.value_us(99.0, now) is not None
    assert learned.value_us(99.0, now + baseline.MAX_AGE_S + 1) is None


def test_the_threshold_is_bounded_by_at_least_and_at_most(tmp_path):
    trigger = relative(tmp_path, at_least="1ms").policies[0].trigger
    assert trigger.threshold_us(None) == 2000  # not learned: at_most
    assert trigger.threshold_us(70.0) == 1000  # 350 us raised to at_least
    assert trigger.threshold_us(300.0) == 1500
    assert trigger.threshold_us(5000.0) == 2000  # a poisoned baseline cannot disable it
    assert "raised to at_least" in trigger.describe_threshold(70.0)
    assert "no baseline learned yet" in trigger.describe_threshold(None)


def test_until_learned_a_relative_trigger_uses_at_most(tmp_path):
    # A 1.4 ms tail from the first tick: no baseline yet, so the threshold is at_most (2 ms).
    _, per_tick = run(relative(tmp_path), harmful(1, 20, tail_us=1400))
    assert kinds(per_tick) == []


def test_a_tail_far_above_the_baseline_but_under_at_most_acts(tmp_path):
    p = relative(tmp_path)
    state, per_tick = run(p, quiet_windows(1, 32) + harmful(33, 4, tail_us=1400))
    assert kinds(per_tick) == [(33, "act", 0)]
    tail = per_tick[33][0].evidence["protected_tail"]
    assert 90 <= tail["baseline_us"] <= 110 and tail["threshold_us"] == 5 * tail["baseline_us"]
    assert "x baseline" in per_tick[33][0].evidence["reason"]


def test_the_same_tail_is_left_alone_against_an_absolute_threshold(tmp_path):
    absolute = policies(tmp_path, n=2, m=4)  # above = "2ms"
    _, per_tick = run(absolute, quiet_windows(1, 32) + harmful(33, 4, tail_us=1400))
    assert kinds(per_tick) == []


def test_nothing_is_learned_while_a_ladder_is_in_place(tmp_path):
    p = relative(tmp_path)
    state, _ = run(p, quiet_windows(1, 32) + harmful(33, 2, tail_us=1400))
    assert state.active()
    before = state.baselines
    state, _ = run(p, quiet_windows(35, 40, tail_us=150), state=state)
    assert state.baselines.to_json() == before.to_json()


def test_the_baseline_survives_a_restart(tmp_path):
    p = relative(tmp_path)
    state, _ = run(p, quiet_windows(1, 32))
    now = 32 * TICK
    learned = state.baselines.value_us(99.0, now)
    assert learned is not None
    restored = import_state(export_state(state))
    assert restored.baselines.value_us(99.0, now) == learned
    # Harm at once after the restart is judged against the restored baseline.
    _, per_tick = run(p, harmful(33, 4, tail_us=1400), state=restored)
    assert kinds(per_tick) == [(1, "act", 0)]


def test_a_state_file_without_baselines_still_loads(tmp_path):
    data = export_state(EngineState())
    del data["baselines"]
    assert import_state(data).baselines.by_percentile == {}


def test_the_exported_baseline_changes_once_learned_then_once_a_minute_not_every_tick(tmp_path):
    """The daemon rewrites its state file whenever the export changes."""
    p = relative(tmp_path)
    per_block = int(baseline.BLOCK_S / TICK)
    state, exports = EngineState(), []
    for s in quiet_windows(1, per_block * (baseline.MIN_BLOCKS + 2 * baseline.EXPORT_EVERY)):
        state, _ = decide(state, s, p, SETTINGS)
        exports.append(export_state(state)["baselines"])
    changed_at = [i + 1 for i, (a, b) in enumerate(zip(exports, exports[1:])) if a != b]
    first_blocks = [per_block * n - 1 for n in range(1, baseline.MIN_BLOCKS + 1)]
    then = [per_block * (baseline.MIN_BLOCKS + baseline.EXPORT_EVERY * n) - 1 for n in (1, 2)]
    assert changed_at == first_blocks + then
    assert len(exports[-1]["99"]) == baseline.MIN_BLOCKS + 2 * baseline.EXPORT_EVERY


def test_a_baseline_learned_in_this_process_wins_over_the_saved_one(tmp_path):
    """A dry run that turns live has learned while the saved state aged."""
    p = relative(tmp_path)
    saved, _ = run(p, quiet_windows(1, 32, tail_us=300))
    current, _ = run(p, quiet_windows(1, 32, tail_us=100))
    now = 32 * TICK
    assert import_state(export_state(saved)).baselines.value_us(99.0, now) > 250
    assert import_state(export_state(saved), current).baselines.value_us(99.0, now) < 150


def test_the_remembered_value_is_the_value_worked_out_afresh_as_blocks_age_out():
    # Five blocks of 100 us, then four of 200 us: as the older ones pass MAX_AGE_S the median
    # moves, and the value the engine is given at each instant must be the one a fresh baseline gives.
    per_block = int(baseline.BLOCK_S / TICK)
    learned, now = learn([100.0] * per_block * 5 + [200.0] * per_block * 4)
    remembered = learned.by_percentile[99.0]
    seen = set()
    for step in range(0, 200):
        at = now + baseline.MAX_AGE_S - 20 + step * 0.25
        fresh = baseline.PercentileBaseline(remembered.blocks)  # nothing remembered
        assert remembered.value_us(at) == fresh.value_us(at), at
        seen.add(remembered.value_us(at))
    assert len(seen) >= 3  # ~100 us, ~200 us, None once too few blocks are left (and medians between)
    assert None in seen


def test_a_window_that_closes_no_block_keeps_the_remembered_value_and_one_that_does_does_not():
    per_block = int(baseline.BLOCK_S / TICK)
    learned, now = learn([100.0] * per_block * 3)
    before = learned.value_us(99.0, now)
    half = learned.learn({99.0: 2000.0}, counts(900.0), TICK, now + TICK)  # adds to the open block only
    assert half.by_percentile[99.0].blocks == learned.by_percentile[99.0].blocks
    assert half.value_us(99.0, now + TICK) == before
    closed, at = half, now + TICK
    for _ in range(per_block * 4):  # four more blocks at 900 us: the median moves to 900
        at += TICK
        closed = closed.learn({99.0: 2000.0}, counts(900.0), TICK, at)
    assert closed.value_us(99.0, at) > 800


def test_each_policys_threshold_is_its_rules_learned_or_not(tmp_path):
    """thresholds_now works each distinct tail rule out once: every policy with a threshold gets
    what state.threshold_us(policy) says, before and after the baseline is learned."""
    import dataclasses
    from pathlib import Path

    from remediator.engine import thresholds_now
    from remediator.model import PolicySet
    from remediator.policy import load_policies

    shipped = load_policies([Path(__file__).resolve().parent.parent / "policies"])
    absolute = dataclasses.replace(policies(tmp_path / "..", n=2, m=4).policies[0], name="absolute")
    mixed = PolicySet(shipped.policies + relative(tmp_path).policies + (absolute,))
    assert len({policy.name for policy in mixed.policies}) == len(mixed.policies)
    assert len(mixed.tail_rules) < len([p for p in mixed.policies if not p.trigger.always])  # rules are shared
    state, _ = run(relative(tmp_path), quiet_windows(1, 40))
    for engine_state, now in ((EngineState(), 1.0), (state, TICK * 40)):
        found = {name: (percentile, threshold) for percentile, threshold, names in thresholds_now(engine_state, mixed, now)
                 for name in names}
        expected = {policy.name: (policy.trigger.tail_percentile or 99.0, engine_state.threshold_us(policy, now))
                    for policy in mixed.policies
                    if not policy.trigger.always and engine_state.threshold_us(policy, now) is not None}
        assert found == expected
    assert any(threshold < 2000 for _p, threshold, _n in thresholds_now(state, mixed, TICK * 40))  # learned: under at_most
