"""The detector: per-window statistics from Samples, and whether a policy's trigger holds.

Pure: no I/O, no clock. A window is one tick's Sample. The engine keeps the recent windows and asks
`evaluate_trigger` for each candidate offender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from . import histogram
from .model import Trigger
from .procfs import ProcessIdentity
from .sample import Sample
from .trees import lineages_of, tree_pids


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
    # The probe's split of wait_ns (sample.ProtectedWaits): it knows in the kernel which threads are
    # the service's, forked children included, so it is preferred to a sum over the blame list.
    own_ns: int = 0  # behind the protected processes' own threads
    others_ns: int = 0  # behind other processes: all a neighbour can be blamed for
    # pid -> its identity and its known ancestors' (trees.lineage), for the processes that ran or
    # were blamed: a tree policy rolls their CPU and blame up to the matched ancestor.
    lineages: Mapping[int, tuple[ProcessIdentity, ...]] = field(default_factory=dict)
    throttled_ns: int | None = None  # the protected cgroups throttled by their own quota; None: not measured
    throttled_periods: int = 0
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
            own_ns=sample.protected.own_ns,
            others_ns=sample.protected.blamed_ns,
            lineages=lineages_of(set(usage_pids(sample)) | {pid for pid, _ in sample.blame}, sample.processes),
            throttled_ns=None if sample.throttling is None else sample.throttling.throttled_ns,
            throttled_periods=0 if sample.throttling is None else sample.throttling.throttled_periods,
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

    def members(self, root: ProcessIdentity | None, pid: int) -> list[int]:
        """The pids judged together: `pid` alone, or every process of the tree under `root`."""
        return [pid] if root is None else tree_pids(self.lineages, root) or [pid]

    def group_cpus(self, pids: list[int]) -> float:
        return sum(self.cpus(pid) for pid in pids)

    def group_peak_cpus(self, pids: list[int]) -> float | None:
        """A lower bound of the group's busiest sub-window: the members' peaks may fall in different
        sub-windows, so their sum could overstate it; the busiest member, or the group's mean, cannot."""
        peaks = [value for pid in pids if (value := self.peak_cpus(pid)) is not None]
        return max(peaks + [self.group_cpus(pids)]) if peaks else None

    def group_blame(self, pids: list[int]) -> int:
        return sum(self.blame.get(pid, 0) for pid in pids)


def combined_tail_us(windows: Iterable[Window], percentile: float) -> float | None:
    """The percentile over several windows together (their histograms added)."""
    counts: dict[int, int] = {}
    for window in windows:
        for slot, count in (window.counts or {}).items():
            counts[slot] = counts.get(slot, 0) + count
    value = histogram.percentile(counts, percentile) if counts else None
    return None if value is None else value / 1000.0


def usage_pids(sample: Sample) -> list[int]:
    return [entry.pid for entry in sample.usage]


def blame_share(windows: Sequence[Window], pid: int) -> float:
    waited = sum(window.wait_ns for window in windows)
    return sum(window.blame.get(pid, 0) for window in windows) / waited if waited else 0.0


def wait_split(windows: Sequence[Window]) -> dict[str, float]:
    """Shares of the protected wait behind its own threads, behind others, and behind nobody known."""
    waited = sum(window.wait_ns for window in windows)
    if not waited:
        return {"behind_own": 0.0, "behind_others": 0.0, "unattributed": 0.0}
    own = sum(window.own_ns for window in windows) / waited
    others = sum(window.others_ns for window in windows) / waited
    return {"behind_own": round(own, 3), "behind_others": round(others, 3), "unattributed": round(max(0.0, 1.0 - own - others), 3)}
def own_throttling(windows: Sequence[Window]) -> dict | None:
    """The protected service's own-quota throttling over `windows`, or None when not measured."""
    measured = [window for window in windows if window.throttled_ns is not None]
    if not measured:
        return None
    return {
        "throttled_ns": sum(window.throttled_ns or 0 for window in measured),
        "throttled_periods": sum(window.throttled_periods for window in measured),
        "behind_others_ns": sum(window.others_ns for window in measured),
        "wait_ns": sum(window.wait_ns for window in measured),
    }


def self_inflicted(windows: Sequence[Window]) -> dict | None:
    """Evidence that the tail over `windows` (the trigger's last M) is the service's own doing, or None.

    Self-inflicted: its cgroup was throttled by its own quota, and for at least as long as all
    other processes together ran on its CPUs while it waited. Then no neighbour's step can bring
    the tail down (the quota would still stop the service), so none is taken.
    """
    throttling = own_throttling(windows)
    if throttling is None or throttling["throttled_ns"] <= 0:
        return None
    if throttling["throttled_ns"] < throttling["behind_others_ns"]:
        return None
    return throttling


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
    wait_split: Mapping[str, float] = field(default_factory=dict)  # wait_split() of the judged windows

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
            "protected_wait": dict(self.wait_split),
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


def evaluate_trigger(trigger: Trigger, windows: Sequence[Window], pid: int, baseline_us: float | None = None,
                     root: ProcessIdentity | None = None) -> TriggerEvidence:
    """Does `pid` meet the trigger over the recent windows?

    The tail must be above the threshold (for a relative trigger: from the service's learned
    `baseline_us`, or at_most without one) in at least N of the last M windows; the offender is
    judged over those same windows: its highest mean and peak CPU, and its share of the protected
    wait time summed over them. With `root` (a tree policy), the offender is the whole tree under
    that ancestor: its members' CPU and blame added up, window by window.
    """
    percentile = trigger.tail_percentile or 99.0
    threshold = trigger.threshold_us(baseline_us)
    recent, over = tail_over(trigger, windows, baseline_us)
    tail_ok = len(over) >= (trigger.windows or 1)
    judged = over or recent[-1:]
    latest = judged[-1].tail_us(percentile) if judged else None
    tails = [value for window in over if (value := window.tail_us(percentile)) is not None]
    groups = [(window, window.members(root, pid)) for window in judged]
    cpu = max((window.group_cpus(pids) for window, pids in groups), default=0.0)
    peaks = [value for window, pids in groups if (value := window.group_peak_cpus(pids)) is not None]
    peak = max(peaks) if peaks else None
    waited = sum(window.wait_ns for window in judged)
    share = sum(window.group_blame(pids) for window, pids in groups) / waited if waited else 0.0
    members = max((len(pids) for _, pids in groups), default=1)

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
    if root is not None:
        reason += f" (the tree under pid {root.pid}: {members} of its processes ran)"
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
        wait_split=wait_split(judged),
    )
