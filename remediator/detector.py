"""The detector: per-window statistics from Samples, and whether a policy's trigger holds.

Pure: no I/O, no clock. A window is one tick's Sample. The engine keeps the recent windows and asks
`evaluate_trigger` for each candidate offender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from . import histogram
from .policy import Trigger
from .sample import Sample


@dataclass(frozen=True)
class Window:
    """What the engine keeps of one tick: the protected tail, who used CPU, who was blamed."""

    start_s: float  # CLOCK_MONOTONIC seconds
    end_s: float
    counts: Mapping[int, int] | None  # protected wait histogram; None: the source has no tail
    wait_ns: int
    usage: Mapping[int, tuple[int, int | None]]  # pid -> (cpu ns, peak ns)
    blame: Mapping[int, int]  # pid -> ns
    window_ns: int
    _percentiles: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_sample(cls, sample: Sample) -> "Window":
        return cls(
            start_s=sample.start_ns / 1e9,
            end_s=sample.end_ns / 1e9,
            counts=None if sample.protected.histogram is None else dict(sample.protected.histogram),
            wait_ns=sample.protected.wait_ns,
            usage={entry.pid: (entry.cpu_ns, entry.peak_ns) for entry in sample.usage},
            blame=dict(sample.blame),
            window_ns=sample.window_ns,
        )

    @property
    def duration_s(self) -> float:
        return max(1e-9, self.end_s - self.start_s)

    def tail_us(self, percentile: float) -> float | None:
        """The protected wait at `percentile` in this window (µs); None without waits or a histogram."""
        if percentile not in self._percentiles:
            value = histogram.percentile(self.counts, percentile) if self.counts else None
            self._percentiles[percentile] = None if value is None else value / 1000.0
        return self._percentiles[percentile]

    def cpus(self, pid: int) -> float:
        cpu_ns, _ = self.usage.get(pid, (0, None))
        return cpu_ns / (self.duration_s * 1e9)

    def peak_cpus(self, pid: int) -> float | None:
        if not self.window_ns:
            return None
        _, peak_ns = self.usage.get(pid, (0, 0))
        return None if peak_ns is None else peak_ns / self.window_ns


def combined_tail_us(windows: Iterable[Window], percentile: float) -> float | None:
    """The percentile over several windows together (their histograms added)."""
    counts: dict[int, int] = {}
    for window in windows:
        for slot, count in (window.counts or {}).items():
            counts[slot] = counts.get(slot, 0) + count
    value = histogram.percentile(counts, percentile) if counts else None
    return None if value is None else value / 1000.0


def blame_share(windows: Sequence[Window], pid: int) -> float:
    waited = sum(window.wait_ns for window in windows)
    return sum(window.blame.get(pid, 0) for window in windows) / waited if waited else 0.0


@dataclass(frozen=True)
class TriggerEvidence:
    """Why a trigger fired or not, in the numbers the audit shows."""

    fired: bool
    tail_ok: bool
    percentile: float | None
    threshold_us: float | None
    windows_over: int
    of_windows: int
    tail_us: float | None  # the percentile in the latest window over the threshold (or the latest)
    worst_tail_us: float | None
    offender_cpu: float  # mean CPUs, the highest of the windows considered
    offender_peak_cpu: float | None
    blame_share: float
    reason: str
    baseline_us: float | None = None  # the learned quiet baseline a relative threshold came from

    def to_json(self) -> dict:
        def rounded(value):
            return None if value is None else round(value, 3)

        return {
            "protected_tail": {
                "percentile": self.percentile,
                "value_us": rounded(self.tail_us),
                "worst_us": rounded(self.worst_tail_us),
                "threshold_us": self.threshold_us,
                "baseline_us": rounded(self.baseline_us),
                "windows_over": self.windows_over,
                "of_windows": self.of_windows,
            },
            "offender": {
                "cpu": rounded(self.offender_cpu),
                "peak_cpu": rounded(self.offender_peak_cpu),
                "blame_share": rounded(self.blame_share),
            },
            "reason": self.reason,
        }


def tail_over(trigger: Trigger, windows: Sequence[Window], baseline_us: float | None = None) -> tuple[list[Window], list[Window]]:
    """(the last M windows, those of them whose tail is above the threshold, which for a relative
    trigger comes from `baseline_us`)."""
    threshold = trigger.threshold_us(baseline_us) or 0.0
    recent = list(windows[-(trigger.of_windows or 1):])
    over = [
        window
        for window in recent
        if (value := window.tail_us(trigger.tail_percentile or 99.0)) is not None and value > threshold
    ]
    return recent, over


def evaluate_trigger(trigger: Trigger, windows: Sequence[Window], pid: int, baseline_us: float | None = None) -> TriggerEvidence:
    """Does `pid` meet the trigger over the recent windows?

    The tail must be above the threshold (for a relative trigger: from the service's learned
    `baseline_us`, or at_most without one) in at least N of the last M windows; the offender is
    judged over those same windows: its highest mean and peak CPU, and its share of the protected
    wait time summed over them.
    """
    percentile = trigger.tail_percentile or 99.0
    threshold = trigger.threshold_us(baseline_us)
    recent, over = tail_over(trigger, windows, baseline_us)
    tail_ok = len(over) >= (trigger.windows or 1)
    judged = over or recent[-1:]
    latest = judged[-1].tail_us(percentile) if judged else None
    tails = [value for window in over if (value := window.tail_us(percentile)) is not None]
    cpu = max((window.cpus(pid) for window in judged), default=0.0)
    peaks = [value for window in judged if (value := window.peak_cpus(pid)) is not None]
    peak = max(peaks) if peaks else None
    share = blame_share(judged, pid)

    checks = []
    if trigger.offender_cpu is not None:
        measured = peak if trigger.offender_cpu_kind == "peak" and peak is not None else cpu
        checks.append((measured >= trigger.offender_cpu, f"{trigger.offender_cpu_kind} CPU {measured:.2f} vs {trigger.offender_cpu:g}"))
    if trigger.offender_blame_share is not None:
        checks.append((share >= trigger.offender_blame_share, f"blame share {share:.2f} vs {trigger.offender_blame_share:g}"))
    if trigger.offender_require == "all":
        offender_ok = bool(checks) and all(ok for ok, _ in checks)
    else:
        offender_ok = any(ok for ok, _ in checks)
    tail_text = (
        f"p{percentile:g} above {trigger.describe_threshold(baseline_us)} in {len(over)} of the last {len(recent)} windows "
        f"(need {trigger.windows} of {trigger.of_windows})"
    )
    reason = tail_text + "; " + ", ".join(text for _, text in checks)
    return TriggerEvidence(
        fired=tail_ok and offender_ok,
        tail_ok=tail_ok,
        percentile=percentile,
        threshold_us=threshold,
        windows_over=len(over),
        of_windows=trigger.of_windows or 1,
        tail_us=latest,
        worst_tail_us=max(tails) if tails else latest,
        offender_cpu=cpu,
        offender_peak_cpu=peak,
        blame_share=share,
        reason=reason,
        baseline_us=baseline_us if trigger.relative else None,
    )
