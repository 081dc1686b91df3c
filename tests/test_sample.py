"""Samples survive a file round trip unchanged; merging adds up what should add up."""

from __future__ import annotations

import io
import json

import pytest

from remediator.errors import RemediatorError
from remediator.procfs import ProcessInfo
from remediator.sample import ProcessUsage, ProtectedWaits, Sample, merge_samples, read_samples, write_samples


def make_sample(start_ns=1_000_000_000, seconds=1.0, histogram=((100, 5), (180, 1)), max_ns=40_000, peak=90_000_000):
    end_ns = start_ns + int(seconds * 1e9)
    return Sample(
        ts=1_700_000_000.5 + start_ns / 1e9,
        start_ns=start_ns,
        end_ns=end_ns,
        source="bpf",
        window_ns=100_000_000,
        ncpus=2,
        protected=ProtectedWaits(
            threads=3, pids=(42,), waits=6, wakeups=5, preemptions=1, wait_ns=70_000, max_ns=max_ns,
            histogram=histogram, blamed_ns=55_000, unattributed_ns=10_000, own_ns=5_000, overflow_ns=4_000,
        ),
        usage=(ProcessUsage(77, "fluent-bit", 1_900_000_000, peak, False), ProcessUsage(42, "api", 90_000_000, 9_000_000, True)),
        blame=((77, 55_000), (9, 5_000)),
        cpu_busy_ns=(990_000_000, 1_000_000_000),
        processes={
            77: ProcessInfo(pid=77, start_time=123, comm="fluent-bit", exe="/usr/bin/fluent-bit",
                            cmdline=("fluent-bit", "-c", "x.conf"), cgroup="/system.slice/fluent-bit.service",
                            unit="fluent-bit.service", uid=0, user="root", ppid=1, ancestors=((5, "containerd"),)),
        },
        psi_some_us=12_000,
        lost={"stale_starts": 1},
    )


def test_round_trip_through_a_file(tmp_path):
    samples = [make_sample(), make_sample(start_ns=2_000_000_000, histogram=None, max_ns=None, peak=None)]
    path = tmp_path / "recording.jsonl"
    with path.open("w") as stream:
        write_samples(stream, samples)
    assert list(read_samples(path)) == samples


def test_json_is_plain_data():
    text = json.dumps(make_sample().to_json())
    assert Sample.from_json(json.loads(text)) == make_sample()


def test_a_bad_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    buffer = io.StringIO()
    write_samples(buffer, [make_sample()])
    path.write_text(buffer.getvalue() + '{"version": 1}\n')
    with pytest.raises(RemediatorError, match=r"bad\.jsonl:2: not a remediator sample"):
        list(read_samples(path))


def test_derived_figures():
    sample = make_sample()
    assert sample.blame_share(77) == pytest.approx(55_000 / 70_000)
    assert sample.cpus_used(sample.usage[0]) == pytest.approx(1.9)
    assert sample.peak_cpus(sample.usage[0]) == pytest.approx(0.9)
    assert sample.protected.percentile_ns(50) is not None


def test_merge_adds_counts_and_keeps_peaks_and_maxima():
    first = make_sample(max_ns=40_000, peak=90_000_000)
    second = make_sample(start_ns=2_000_000_000, max_ns=70_000, peak=50_000_000)
    merged = merge_samples([first, second])
    assert merged.duration_ns == 2_000_000_000
    assert merged.protected.waits == 12
    assert merged.protected.max_ns == 70_000
    assert dict(merged.protected.histogram) == {100: 10, 180: 2}
    assert merged.usage_of(77).cpu_ns == 3_800_000_000
    assert merged.usage_of(77).peak_ns == 90_000_000
    assert merged.blame_of(77) == 110_000
    assert merged.psi_some_us == 24_000


def test_merge_refuses_samples_with_a_gap():
    with pytest.raises(ValueError, match="follow each other"):
        merge_samples([make_sample(), make_sample(start_ns=5_000_000_000)])


def test_a_recording_from_before_the_wait_split_reads_with_the_new_fields_at_zero():
    old = make_sample().to_json()
    for key in ("own_ns", "overflow_ns"):
        del old["protected"][key]
    waits = Sample.from_json(old).protected
    assert (waits.own_ns, waits.overflow_ns, waits.blamed_ns, waits.unattributed_ns) == (0, 0, 55_000, 10_000)


def test_the_shipped_recordings_still_read():
    from pathlib import Path

    recordings = sorted((Path(__file__).parent / "fixtures" / "recordings").glob("*.jsonl"))
    assert recordings
    for path in recordings:
        samples = list(read_samples(path))
        assert samples and all(sample.protected.own_ns >= 0 for sample in samples)


def test_merge_adds_the_wait_split():
    merged = merge_samples([make_sample(), make_sample(start_ns=2_000_000_000)])
    assert (merged.protected.own_ns, merged.protected.blamed_ns, merged.protected.overflow_ns) == (10_000, 110_000, 8_000)


def test_watch_shows_where_the_wait_went():
    from remediator.view import interval_view, render_text

    sample = make_sample()
    view = interval_view(sample)
    assert (view["protected"]["behind_own_us"], view["protected"]["behind_others_us"], view["protected"]["unattributed_us"]) == (5.0, 55.0, 10.0)
    assert "waited behind: own threads 7%, others 79%, unattributed 14%" in render_text(view, sample)
    procfs = Sample.from_json({**sample.to_json(), "protected": {**sample.to_json()["protected"], "histogram": None}})
    assert interval_view(procfs)["protected"]["behind_own_us"] is None
