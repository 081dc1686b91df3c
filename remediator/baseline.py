"""The protected service's own quiet baseline: what its run-queue tail normally is, learned online.

A trigger written `above = "5x baseline"` is judged against it, so a service whose p99 is normally
70 us is defended at a millisecond, not only at the absolute ceiling. Pure: no I/O, no clock
(engine time comes in with each window), so replay learns exactly what the live run learned.

Learning, and why it is hard to fool:
- only from quiet windows, which the engine picks: no remediation in place, the tail not over any
  trigger's threshold, and at least MIN_WAITS protected waits (a p99 of five waits is their max);
- quiet windows are summed into blocks of BLOCK_S seconds; a block's value is the percentile of
  its combined histogram (a p99 over about a thousand waits at 1000 waits/s, not over a few);
- the baseline is the median of the latest MAX_BLOCKS blocks no older than MAX_AGE_S, known once
  there are MIN_BLOCKS: a few odd blocks (a burst that stayed under the threshold) cannot move a
  median. The trigger's `at_least` and `at_most` bound what a baseline can do to the threshold.
Closed blocks are kept across a restart (export), but the copy exported is renewed only once the
baseline is learned and then every EXPORT_EVERY blocks: the daemon rewrites (and fsyncs) its state
file whenever the export changes, so once a minute of quiet at most, not every tick; a crash loses
at most that minute of learning.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Mapping

from . import histogram

MIN_WAITS = 50  # protected waits a window needs to say anything about a p99
BLOCK_S = 2.0  # quiet time summed into one block value
MIN_BLOCKS = 3  # blocks before the baseline counts as learned: 6 s of quiet windows
MAX_BLOCKS = 240  # the sliding period: the latest 240 blocks (8 minutes of quiet) ...
MAX_AGE_S = 6 * 3600.0  # ... no older than 6 hours
EXPORT_EVERY = 30  # blocks between two exports (a minute of quiet)


@dataclass(frozen=True)
class Block:
    end_s: float  # engine time of the block's last window
    value_us: float  # the percentile over the block's quiet windows together


@dataclass(frozen=True)
class PercentileBaseline:
    """The baseline of one percentile (p99, p99.9): closed blocks and the block being filled."""

    blocks: tuple[Block, ...] = ()
    open_counts: Mapping[int, int] = field(default_factory=dict)
    open_s: float = 0.0
    exported: tuple[Block, ...] = ()  # the blocks as last exported (see EXPORT_EVERY)
    since_export: int = 0  # blocks closed since
    # The last value_us: (from, until, value). The engine asks it several times a tick and the
    # answer changes only when a block ages out (the blocks themselves never change: learning
    # makes a new PercentileBaseline).
    _value_memo: list = field(default_factory=list, compare=False, repr=False)

    def recent(self, now: float) -> tuple[Block, ...]:
        return tuple(block for block in self.blocks if block.end_s >= now - MAX_AGE_S)[-MAX_BLOCKS:]

    def value_us(self, now: float) -> float | None:
        """The learned baseline, or None while fewer than MIN_BLOCKS recent blocks are known."""
        memo = self._value_memo
        if memo and memo[0] <= now <= memo[1]:
            return memo[2]
        recent = self.recent(now)
        value = None if len(recent) < MIN_BLOCKS else float(statistics.median(block.value_us for block in recent))
        # Blocks older than `now` allows stay out as time goes on; the oldest in stays until its age passes.
        until = recent[0].end_s + MAX_AGE_S if recent else float("inf")
        memo[:] = [now, until, value]
        return value

    def learn(self, counts: Mapping[int, int], duration_s: float, end_s: float, percentile: float) -> "PercentileBaseline":
        merged = dict(self.open_counts)
        for slot, count in counts.items():
            merged[slot] = merged.get(slot, 0) + count
        open_s = self.open_s + duration_s
        if open_s < BLOCK_S - 1e-9:
            return PercentileBaseline(self.blocks, merged, open_s, self.exported, self.since_export,
                                      self._value_memo)  # the same blocks: the same value
        value = histogram.percentile(merged, percentile)
        blocks = self.recent(end_s)
        if value is not None:
            blocks = (blocks + (Block(end_s, round(value / 1000.0, 1)),))[-MAX_BLOCKS:]
        since = self.since_export + 1
        if len(self.exported) < MIN_BLOCKS or since >= EXPORT_EVERY:
            return PercentileBaseline(blocks, {}, 0.0, blocks, 0)
        return PercentileBaseline(blocks, {}, 0.0, self.exported, since)


@dataclass(frozen=True)
class Baselines:
    """One PercentileBaseline per percentile that a relative trigger watches."""

    by_percentile: Mapping[float, PercentileBaseline] = field(default_factory=dict)

    def value_us(self, percentile: float, now: float) -> float | None:
        baseline = self.by_percentile.get(percentile)
        return None if baseline is None else baseline.value_us(now)

    def learned_from(self, percentile: float, now: float) -> int:
        """How many blocks the baseline of `percentile` rests on (for explain and the audit)."""
        baseline = self.by_percentile.get(percentile)
        return 0 if baseline is None else len(baseline.recent(now))

    def learn(self, percentiles: Mapping[float, float], counts: Mapping[int, int] | None, duration_s: float,
              end_s: float) -> "Baselines":
        """Add one window to the baselines of the percentiles it is quiet for.

        `percentiles` maps each percentile to the lowest threshold (us) any trigger on it has now:
        the window is learned from only when its own value at that percentile is not over it."""
        if not counts or histogram.total(counts) < MIN_WAITS:
            return self
        changed = dict(self.by_percentile)
        for percentile, threshold_us in percentiles.items():
            value = histogram.percentile(counts, percentile)
            if value is None or value / 1000.0 > threshold_us:
                continue
            changed[percentile] = changed.get(percentile, PercentileBaseline()).learn(counts, duration_s, end_s, percentile)
        return Baselines(changed)

    def to_json(self) -> dict:
        """The blocks as last exported (see EXPORT_EVERY); what came after is lost on a restart."""
        return {
            f"{percentile:g}": [[block.end_s, block.value_us] for block in baseline.exported]
            for percentile, baseline in sorted(self.by_percentile.items())
            if baseline.exported
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Baselines":
        """ValueError when `data` is not what to_json wrote."""
        if not isinstance(data, Mapping):
            raise ValueError(f"baselines: expected a table, got {data!r}")
        by_percentile = {}
        for name, blocks in data.items():
            try:
                percentile = float(name)
                parsed = tuple(Block(float(end_s), float(value_us)) for end_s, value_us in blocks)
            except (TypeError, ValueError):
                raise ValueError(f"baselines: malformed entry {name!r}") from None
            if not 0 < percentile <= 100 or any(block.value_us < 0 for block in parsed):
                raise ValueError(f"baselines: out of range entry {name!r}")
            by_percentile[percentile] = PercentileBaseline(parsed[-MAX_BLOCKS:], exported=parsed[-MAX_BLOCKS:])
        return cls(by_percentile)


def learning_needs() -> str:
    """What it takes to learn a baseline, for explain and the audit."""
    return f"{MIN_BLOCKS * BLOCK_S:g} s of quiet windows with at least {MIN_WAITS} protected waits each"
