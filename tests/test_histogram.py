"""Bucket math and percentiles: the Python twin against the C in probes/sched_monitor.h, and
percentile estimates against known distributions."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from remediator import histogram

PROBES = Path(__file__).resolve().parent.parent / "probes"


def test_slots_cover_every_value_once_in_order():
    previous_high = 0
    for slot in range(histogram.SLOTS):
        low, high = histogram.slot_bounds(slot)
        assert low == previous_high, f"gap or overlap before slot {slot}"
        assert high > low
        assert histogram.slot_of(low) == slot
        assert histogram.slot_of(high - 1) == slot
        previous_high = high
    assert previous_high == 1 << histogram.MAX_POW


def test_bucket_width_is_at_most_an_eighth_of_its_value():
    for slot in range(histogram.SUB_COUNT, histogram.SLOTS):
        low, high = histogram.slot_bounds(slot)
        assert (high - low) / low <= 1 / histogram.SUB_COUNT


def test_huge_values_land_in_the_last_bucket():
    assert histogram.slot_of(1 << 40) == histogram.SLOTS - 1
    assert histogram.slot_of((1 << histogram.MAX_POW) - 1) == histogram.SLOTS - 1


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to compile the probe header")
def test_c_bucket_function_agrees_with_python(tmp_path):
    rng = random.Random(7)
    values = list(range(0, 300)) + [(1 << e) + d for e in range(3, 45) for d in (-1, 0, 1)]
    values += [rng.randrange(1 << rng.randrange(1, 44)) for _ in range(5000)]
    values = [v for v in values if v >= 0]
    program = tmp_path / "slots.c"
    program.write_text(
        '#define SCHED_MONITOR_STANDALONE\n#include <stdio.h>\n#include "sched_monitor.h"\n'
        "int main(void) { unsigned long long v; while (scanf(\"%llu\", &v) == 1) printf(\"%u\\n\", hist_slot(v)); return 0; }\n"
    )
    binary = tmp_path / "slots"
    subprocess.run(["gcc", "-O2", f"-I{PROBES}", "-o", str(binary), str(program)], check=True)
    out = subprocess.run([str(binary)], input="\n".join(map(str, values)), capture_output=True, text=True, check=True)
    c_slots = [int(line) for line in out.stdout.split()]
    assert c_slots == [histogram.slot_of(v) for v in values]
    header = (PROBES / "sched_monitor.h").read_text()
    assert f"#define HIST_SUB_BITS {histogram.SUB_BITS}" in header
    assert f"#define HIST_MAX_POW {histogram.MAX_POW}" in header


def exact_percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


@pytest.mark.parametrize(
    "name, draw",
    [
        ("uniform 1us-10ms", lambda rng: rng.randint(1_000, 10_000_000)),
        ("exponential mean 50us", lambda rng: int(rng.expovariate(1 / 50_000)) + 1),
        ("lognormal", lambda rng: int(rng.lognormvariate(10, 1.5)) + 1),
        ("bimodal 5us / 3ms", lambda rng: rng.choice([rng.randint(4_000, 6_000)] * 98 + [rng.randint(2_800_000, 3_200_000)] * 2)),
    ],
)
def test_percentiles_within_bucket_precision(name, draw):
    rng = random.Random(name)
    values = [draw(rng) for _ in range(200_000)]
    counts = histogram.from_values(values)
    for q in (50, 90, 99, 99.9):
        estimate = histogram.percentile(counts, q)
        exact = exact_percentile(values, q)
        assert abs(estimate - exact) / exact <= 0.125, f"{name} p{q}: {estimate} vs {exact}"


def test_percentile_of_known_small_histogram():
    # 99 waits of 10 us and one of 1 ms: p50 sits in 10 us's bucket, p99.5 in 1 ms's.
    counts = histogram.from_values([10_000] * 99 + [1_000_000])
    low, high = histogram.slot_bounds(histogram.slot_of(10_000))
    assert low <= histogram.percentile(counts, 50) <= high
    low, high = histogram.slot_bounds(histogram.slot_of(1_000_000))
    assert low <= histogram.percentile(counts, 99.5) <= high
    assert histogram.percentile({}, 99) is None


def test_subtract_cumulative_histograms():
    before = [0] * histogram.SLOTS
    after = list(before)
    after[5] = 3
    after[100] = 7
    before[100] = 2
    assert histogram.subtract(after, before) == {5: 3, 100: 5}
    assert histogram.subtract(after, None) == {5: 3, 100: 7}


def test_runqlat_style_rows():
    counts = histogram.from_values([1_500, 3_000, 3_500, 700_000])
    rows = histogram.log2_rows(counts)
    assert rows[0] == (0, 1, 1)  # 1.5 us
    assert rows[1] == (2, 3, 2)
    assert rows[-1][2] == 1 and rows[-1][0] <= 700 <= rows[-1][1]


def test_sum_wait_stats_sums_every_cpu_and_takes_the_closed_epochs_largest_wait():
    import random

    from remediator import histogram
    from remediator.probes import WAIT_TOTAL_FIELDS, sum_wait_stats

    count = len(WAIT_TOTAL_FIELDS)
    rng = random.Random(7)
    for cpus in (1, 2, 5):
        for closed in (6, 7):
            rows = []
            for _ in range(cpus):
                totals = [rng.randrange(10**9) for _ in range(count)]
                # (epoch, largest wait) for even epochs, then for odd ones; some CPUs saw no wait this epoch
                pairs = [rng.choice([closed, closed - 2]), rng.randrange(10**7), rng.choice([closed, closed - 2]), rng.randrange(10**7)]
                rows.append(tuple(totals + pairs + [rng.randrange(100) for _ in range(histogram.SLOTS)]))
            totals, max_ns, hist = sum_wait_stats(rows, closed)
            assert totals == {name: sum(row[i] for row in rows) for i, name in enumerate(WAIT_TOTAL_FIELDS)}
            at = count + 2 * (closed % 2)
            assert max_ns == max([row[at + 1] for row in rows if row[at] == closed], default=0)
            assert hist == [sum(row[count + 4 + slot] for row in rows) for slot in range(histogram.SLOTS)]
    assert sum_wait_stats([], 3) == (dict.fromkeys(WAIT_TOTAL_FIELDS, 0), 0, [0] * histogram.SLOTS)
