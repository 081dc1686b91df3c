"""What happened in a stretch of time: the samples of a recording and the audit lines, side by side.

The common input of `remediator report` and `remediator policy suggest`: read both files, keep what
falls between --since and --until, and rank the processes the protected threads waited behind.
Pure data in, plain data out; no drawing and no TOML here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .audit import read_audit
from .errors import RemediatorError
from .procfs import ProcessInfo
from .recording import recording_files
from .sample import Sample, read_samples
from .durations import parse_duration


def parse_when(text: str, now: float | None = None) -> float:
    """A point in time as epoch seconds: "30m" / "2h" (that long ago), an epoch number, or an ISO
    8601 time ("2026-12-06T07:00:00", UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RemediatorError(f"{text!r} is not a time: give a duration ago (30m, 2h), an epoch, or an ISO 8601 time "
                              "such as 2026-12-06T07:00:00 (UTC)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class Blamed:
    """One process the protected threads waited behind, over the samples of a scene."""

    pid: int
    comm: str
    info: ProcessInfo | None  # the last description the recording holds
    blame_ns: int  # on the CPU while protected threads waited, over the hot windows
    share: float  # of the protected threads' total wait in the hot windows
    windows: int  # hot windows in which it was the most blamed
    seen: int  # hot windows in which it was blamed at all


@dataclass
class Scene:
    samples: list[Sample]
    records: list[dict]  # audit lines, in file order
    since: float | None = None
    until: float | None = None
    sources: list[str] = field(default_factory=list)  # the files read, for the page's caption

    @property
    def protected_pids(self) -> set[int]:
        return {pid for sample in self.samples for pid in sample.protected.pids}

    def threshold_us(self) -> float | None:
        """The tail threshold the audit's decisions were judged against (the lowest, when several)."""
        values = [tail.get("threshold_us") for record in self.records
                  for tail in [(record.get("evidence") or {}).get("protected_tail") or {}] if tail.get("threshold_us")]
        return min(values) if values else None

    def hot(self, threshold_us: float) -> list[Sample]:
        """Samples whose protected p99 is over `threshold_us`: the windows the incident is made of."""
        return [s for s in self.samples if (s.protected.percentile_ns(99) or 0) > threshold_us * 1000]

    def top_blamed(self, threshold_us: float, limit: int = 5) -> list[Blamed]:
        """Processes ranked by their blame in the hot windows (all windows when none is hot);
        protected processes are left out: they wait behind each other by design."""
        windows = self.hot(threshold_us) or self.samples
        protected = self.protected_pids
        total_wait = sum(s.protected.wait_ns for s in windows)
        blame: dict[int, int] = {}
        first: dict[int, int] = {}
        seen: dict[int, int] = {}
        infos: dict[int, ProcessInfo] = {}
        comms: dict[int, str] = {}
        for sample in windows:
            ranked = [(pid, ns) for pid, ns in sample.blame if pid not in protected and ns > 0]
            for pid, ns in ranked:
                blame[pid] = blame.get(pid, 0) + ns
                seen[pid] = seen.get(pid, 0) + 1
                if pid in sample.processes:
                    infos[pid] = sample.processes[pid]
                usage = sample.usage_of(pid)
                comms[pid] = infos[pid].comm if pid in infos else usage.comm if usage else comms.get(pid, "?")
            if ranked:
                top = max(ranked, key=lambda item: item[1])[0]
                first[top] = first.get(top, 0) + 1
        ranking = sorted(blame.items(), key=lambda item: item[1], reverse=True)[:limit]
        return [Blamed(pid, comms[pid], infos.get(pid), ns, ns / total_wait if total_wait else 0.0, first.get(pid, 0),
                       seen[pid]) for pid, ns in ranking]


def _within(epoch: float, since: float | None, until: float | None) -> bool:
    return (since is None or epoch >= since) and (until is None or epoch <= until)


def load_scene(audit: str | Path | None, recording: str | Path | None, since: float | None = None,
               until: float | None = None) -> Scene:
    """Read the audit log and a recording (with its rotated older half, PATH.1, first)."""
    if audit is None and recording is None:
        raise RemediatorError("nothing to read: give --audit FILE and/or --recording FILE (or --config)")
    samples: list[Sample] = []
    sources = []
    if recording is not None:
        for path in recording_files(recording):
            sources.append(str(path))
            samples += [s for s in read_samples(path) if _within(s.ts, since, until)]
    records: list[dict] = []
    if audit is not None:
        sources.append(str(audit))
        records = [r for r in read_audit(audit) if _within(float(r.get("epoch") or 0), since, until)]
    return Scene(samples, records, since, until, sources)
