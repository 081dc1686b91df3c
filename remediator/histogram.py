"""Log-linear latency histogram: the Python twin of hist_slot() in probes/sched_monitor.h.

Each power of two is split into 2**SUB_BITS equal buckets, so a bucket's width is at most 1/8 of its
lower bound; a percentile interpolated inside its bucket is within about +-6% of the true value
(runqlat's log2 buckets are only within a factor of two). tests/test_histogram.py compiles the C
function with gcc and checks both agree.
"""

from __future__ import annotations

from typing import Iterable, Mapping

SUB_BITS = 3
MAX_POW = 36
SUB_COUNT = 1 << SUB_BITS
SLOTS = (MAX_POW - SUB_BITS + 1) * SUB_COUNT


def slot_of(value_ns: int) -> int:
    if value_ns < SUB_COUNT:
        return max(0, int(value_ns))
    exponent = int(value_ns).bit_length() - 1
    if exponent >= MAX_POW:
        return SLOTS - 1
    return ((exponent - SUB_BITS + 1) << SUB_BITS) | ((int(value_ns) >> (exponent - SUB_BITS)) & (SUB_COUNT - 1))


def slot_bounds(slot: int) -> tuple[int, int]:
    """[low, high) in nanoseconds of a bucket. The last bucket is open-ended; its high is 2**MAX_POW."""
    if slot < SUB_COUNT:
        return slot, slot + 1
    group, sub = slot >> SUB_BITS, slot & (SUB_COUNT - 1)
    shift = group - 1  # exponent - SUB_BITS
    low = (SUB_COUNT + sub) << shift
    return low, low + (1 << shift)


def total(counts: Mapping[int, int]) -> int:
    return sum(counts.values())


def percentile(counts: Mapping[int, int], q: float) -> float | None:
    """The q-th percentile (0 < q <= 100) in ns, interpolated inside its bucket; None when empty."""
    n = total(counts)
    if n == 0:
        return None
    # The rank of the wanted value among n sorted values (1-based, nearest-rank from above).
    rank = q / 100.0 * n
    seen = 0
    for slot in sorted(counts):
        count = counts[slot]
        if count <= 0:
            continue
        if seen + count >= rank:
            low, high = slot_bounds(slot)
            fraction = (rank - seen) / count
            return low + (high - low) * min(max(fraction, 0.0), 1.0)
        seen += count
    low, high = slot_bounds(max(counts))
    return float(high)


def max_upper_bound(counts: Mapping[int, int]) -> float | None:
    nonzero = [slot for slot, count in counts.items() if count > 0]
    return float(slot_bounds(max(nonzero))[1]) if nonzero else None


def from_values(values_ns: Iterable[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for value in values_ns:
        slot = slot_of(value)
        counts[slot] = counts.get(slot, 0) + 1
    return counts


def subtract(after: list[int], before: list[int] | None) -> dict[int, int]:
    """Sparse per-interval counts from two cumulative dense histograms."""
    if before is None:
        return {slot: count for slot, count in enumerate(after) if count}
    return {slot: a - b for slot, (a, b) in enumerate(zip(after, before)) if a - b > 0}


def log2_rows(counts: Mapping[int, int], unit_ns: int = 1000) -> list[tuple[int, int, int]]:
    """Fold into runqlat-style power-of-two rows of `unit_ns` units: (low, high, count)."""
    rows: dict[int, int] = {}
    for slot, count in counts.items():
        if count <= 0:
            continue
        low_ns, _ = slot_bounds(slot)
        row = max(0, (low_ns // unit_ns).bit_length() - 1)  # row 0 holds 0..1, row r holds 2**r..2**(r+1)-1
        rows[row] = rows.get(row, 0) + count
    if not rows:
        return []
    return [(0 if row == 0 else 1 << row, (1 << (row + 1)) - 1, rows.get(row, 0)) for row in range(max(rows) + 1)]
