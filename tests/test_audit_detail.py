"""The one-line detail of an audit record (audit table, report page) for every shape of trigger
evidence: a tick's percentile, the burst path's counted waits, an unnamed culprit's tail that
may have no percentile at all, one tick's tail with no trigger windows. A report once died on a burst record."""

from __future__ import annotations

from remediator.audit import decision_detail


def test_a_tick_trigger_names_the_percentile_and_the_windows():
    record = {"evidence": {"protected_tail": {"percentile": 99.0, "value_us": 2400.0, "threshold_us": 1000.0,
                                              "windows_over": 2, "of_windows": 4}}, "message": "step 1 of 3: cpu_idle"}
    assert decision_detail(record) == "p99 2400.0 us > 1000.0 us (2/4); step 1 of 3: cpu_idle"


def test_a_burst_trigger_names_the_counted_waits():
    record = {"evidence": {"trigger": "burst", "protected_tail": {"waits_over": 3, "threshold_us": 1000.0, "within_ms": 50.0,
                                                                  "span_ms": 12.5, "last_wait_us": 4100.0}},
              "message": "step 1 of 3: cpu_idle"}
    assert decision_detail(record) == "burst: 3 waits > 1000.0 us within 12.5 ms; step 1 of 3: cpu_idle"


def test_a_tail_without_a_percentile_is_left_out():
    record = {"evidence": {"protected_tail": {"percentile": None, "value_us": None, "threshold_us": None}},
              "message": "top blame on batch-job, which no policy names"}
    assert decision_detail(record) == "top blame on batch-job, which no policy names"


def test_one_ticks_tail_has_no_windows_to_count():
    record = {"evidence": {"protected_tail": {"percentile": 99.0, "value_us": 24152.2, "threshold_us": 2000.0, "policy": "restic"}},
              "message": "self-inflicted"}
    assert decision_detail(record) == "p99 24152.2 us > 2000.0 us; self-inflicted"
