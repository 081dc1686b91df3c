"""The engine's state across a restart (export, import, resume) and how much history it keeps.

Pure: no files. The daemon's side (the state file beside the journal, a real restart) is in
tests/test_daemon_restart.py.
"""

from __future__ import annotations

import json

import pytest

from test_engine import SETTINGS, SHIPPER, TICK, hot, kinds, policies, run, sample
from remediator.engine import (EngineSettings, EngineState, decide, export_state, given_back, history_for,
                               import_state, resume)
from remediator.policy import PolicyErrors, load_policies


def restarted(state: EngineState, now: float, still_applied=(), alive=(SHIPPER.identity,), names=("shippers",)) -> EngineState:
    """What a restarted daemon has: the exported state through JSON, fitted to the host."""
    data = json.loads(json.dumps(export_state(state)))
    return resume(import_state(data), now, alive, still_applied, names)


def test_the_state_round_trips_through_json(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    state, per_tick = run(p, [hot(TICK * i) for i in range(1, 30)])  # two steps, then exhausted
    assert [k for _, k, _ in kinds(per_tick) if k != "verify"] == ["act", "act", "exhausted"]
    exported = export_state(state)
    again = import_state(json.loads(json.dumps(exported)))
    assert export_state(again) == exported
    (remediation,) = again.remediations.values()
    assert remediation.step_index == 1 and remediation.applied and remediation.exhausted_warned
    assert len(remediation.action_times) == 2 and again.next_action == state.next_action == 3


@pytest.mark.parametrize("data, what", [
    ({"format": 99}, "format"),
    ({"format": 1, "next_action": 0, "recent_changes": [], "remediations": []}, "next_action"),
    ({"format": 1, "next_action": 1, "recent_changes": ["x"], "remediations": []}, "recent_changes"),
    ({"format": 1, "next_action": 1, "recent_changes": [], "remediations": [{"pid": 1}]}, "start_time"),
])
def test_a_malformed_state_is_refused_with_a_reason(data, what):
    with pytest.raises(ValueError, match=what):
        import_state(data)


def test_a_capped_policy_stays_capped_after_a_restart(tmp_path):
    """hourly = 1: one action, then capped for the hour. The restart gave the change back
    (on_start = "restore"): without the saved count the engine would act again at once."""
    p = policies(tmp_path, n=1, m=1, hourly=1, cooldown="0s")
    state, per_tick = run(p, [hot(TICK)])
    assert [k for _, k, _ in kinds(per_tick)] == ["act"]
    later = [hot(TICK * i) for i in range(2, 10)]

    _, fresh = run(p, later, state=restarted(state, now=TICK * 1.5, alive=()))  # as if nothing were saved
    assert "act" in [k for _, k, _ in kinds(fresh)]
    _, resumed = run(p, later, state=restarted(state, now=TICK * 1.5))
    assert [k for _, k, _ in kinds(resumed)] == ["capped"]


def test_a_change_given_back_at_restart_starts_its_cooldown_then(tmp_path):
    p = policies(tmp_path, n=1, m=1, cooldown="2s")
    state, _ = run(p, [hot(TICK)])
    state = restarted(state, now=1.0)  # the journal no longer holds it: given back at 1.0
    (remediation,) = state.remediations.values()
    assert not remediation.applied and remediation.step_index == -1 and remediation.reverted_at == 1.0
    _, per_tick = run(p, [hot(1.0 + TICK * i) for i in range(1, 12)], state=state)
    acts = [i for i, k, _ in kinds(per_tick) if k == "act"]
    assert acts and 1.0 + TICK * (acts[0] + 1) >= 3.0  # not before the cooldown from the restart


def test_a_change_still_in_place_keeps_its_ladder_position(tmp_path):
    p = policies(tmp_path, n=1, m=1, quiet="2s")
    state, _ = run(p, [hot(TICK)])
    state = restarted(state, now=0.5, still_applied={SHIPPER.identity})
    _, per_tick = run(p, [hot(0.5 + TICK * i) for i in range(1, 8)], state=state)
    assert [(k, step) for _, k, step in kinds(per_tick) if k == "act"] == [("act", 1)]  # step 2, not step 1 again
    # the quiet period restarts with the daemon: no revert on the first quiet ticks after a restart
    state = restarted(run(p, [hot(TICK)])[0], now=10.0, still_applied={SHIPPER.identity})
    _, per_tick = run(p, [sample(10.0 + TICK * i) for i in range(1, 12)], state=state)
    reverts = [i for i, k, _ in kinds(per_tick) if k == "revert"]
    assert reverts and 10.0 + TICK * (reverts[0] + 1) >= 12.0


def test_gone_processes_and_unloaded_policies_are_dropped(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    state, _ = run(p, [hot(TICK)])
    assert restarted(state, now=1.0, alive=()).remediations == {}
    assert restarted(state, now=1.0, names=("another",)).remediations == {}


def test_given_back_keeps_counts_and_starts_cooldowns(tmp_path):
    p = policies(tmp_path, n=1, m=1)
    state, _ = run(p, [hot(TICK)])
    (remediation,) = given_back(state, 2.0).remediations.values()
    assert not remediation.applied and remediation.reverted_at == 2.0 and len(remediation.action_times) == 1


# -- history ------------------------------------------------------------------------------------

LONG_SETTLE = """
[[policy]]
name = "slow"
description = "test"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = {{ percentile = 99.0, above = "2ms", windows = 1, of = {of} }}
offender = {{ cpu = 0.5 }}
[[policy.actions]]
nice = 10
settle = "{settle}"
"""


def test_the_engine_keeps_the_longest_settle_and_the_largest_of(tmp_path):
    p = policies(tmp_path, text=LONG_SETTLE.format(of=600, settle="10m"))
    assert history_for(p, 60.0) == (3 * 600.0 + 120.0, 600)  # before, after, and MAX_REVERIFY re-judgements
    assert history_for(policies(tmp_path, text=LONG_SETTLE.format(of=5, settle="5s")), 0.25) == (120.0, 5)


def test_a_verification_sees_the_whole_settle_period_before_the_step(tmp_path):
    """settle 5 m, well past the former fixed 120 s: the 'before' of the verification must cover it."""
    p = policies(tmp_path, text=LONG_SETTLE.format(of=1, settle="5m"))
    seconds, count = history_for(p, 1.0)
    settings = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10,
                              self_pid=999, history_s=seconds, history_windows=count)
    state = EngineState()
    for t in range(1, 300):  # 299 s of a bad tail with the shipper idle: no trigger
        state, _ = decide(state, sample(float(t), tail_us=5000), p, settings)
    assert state.windows[0].end_s == 1.0  # nothing dropped
    narrow = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10, self_pid=999)
    assert decide(state, sample(300.0), p, narrow)[0].windows[0].end_s >= 180.0  # the old fixed 120 s


def test_the_last_of_windows_are_kept_however_long_the_tick(tmp_path):
    settings = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10,
                              self_pid=999, history_s=120.0, history_windows=10)
    p = policies(tmp_path, n=1, m=1)
    state = EngineState()
    for t in range(1, 30):  # one-minute windows: only two fit in 120 s, the trigger wants ten
        state, _ = decide(state, sample(60.0 * t), p, settings)
    assert len(state.windows) == 10


def test_the_schema_refuses_a_settle_longer_than_the_engine_keeps(tmp_path):
    path = tmp_path / "slow.toml"
    path.write_text(LONG_SETTLE.format(of=5, settle="11m"))
    with pytest.raises(PolicyErrors) as caught:
        load_policies([path])
    (diagnostic,) = [d for d in caught.value.diagnostics if d.severity == "error"]
    text = str(diagnostic)
    assert text.startswith(f"{path}:12:") and "settle" in text and "out of range" in text and "10m" in text, text
