"""A Sample: what the collector saw during one tick, as plain data.

Samples are the only input of the detector and the engine, so a recorded file of them replays
anywhere without a kernel (`remediator record`, `remediator replay`, and the tests). The JSON form
is versioned; `Sample.from_json(sample.to_json()) == sample` holds for every sample.
"""

from __future__ import annotations

import json
from functools import cached_property
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping

from . import histogram, trees
from .errors import RemediatorError
from .jsonlines import read_json_lines
from .procfs import ProcessInfo

SAMPLE_VERSION = 1

SOURCE_BPF = "bpf"
SOURCE_PROCFS = "procfs"


@dataclass(frozen=True)
class ProtectedWaits:
    """Run-queue waits of the protected threads during the tick."""

    threads: int
    pids: tuple[int, ...]
    waits: int  # completed waits (wakeups + preemptions)
    wakeups: int
    preemptions: int
    wait_ns: int
    max_ns: int | None  # None: the source cannot tell
    histogram: tuple[tuple[int, int], ...] | None  # sparse (slot, count); None: no histogram
    blamed_ns: int = 0  # wait behind other processes (not protected): what blame can act on
    unattributed_ns: int = 0  # wait behind nobody known: an idle CPU, or runs older than the probe's ring
    own_ns: int = 0  # wait behind the protected processes' own threads: no neighbour to act on
    overflow_ns: int = 0  # the part of unattributed_ns the probe's run ring no longer held

    def counts(self) -> dict[int, int]:
        return dict(self.histogram or ())

    @cached_property
    def _percentiles(self) -> dict[float, float | None]:
        return {}

    def percentile_ns(self, q: float) -> float | None:
        # Kept per percentile: the engine, the audit, the metrics and the status line each ask.
        if not self.histogram:
            return None
        found = self._percentiles.get(q)
        if found is None:
            found = self._percentiles[q] = histogram.percentile(self.counts(), q)
        return found


@dataclass(frozen=True)
class Throttling:
    """How long the protected processes' cpu cgroups were throttled by their own quota during the
    tick (cpu.stat; see throttling.py). A throttled thread waits in the run queue with no neighbour
    to blame: that part of the tail is self-inflicted."""

    cgroups: tuple[str, ...]  # the protected processes' cpu cgroups
    periods: int  # CFS periods that elapsed with the group runnable
    throttled_periods: int
    throttled_ns: int

    def to_json(self) -> dict:
        return {"cgroups": list(self.cgroups), "periods": self.periods, "throttled_periods": self.throttled_periods,
                "throttled_ns": self.throttled_ns}

    @classmethod
    def from_json(cls, data: dict) -> "Throttling":
        return cls(tuple(str(c) for c in data.get("cgroups", ())), int(data.get("periods", 0)),
                   int(data.get("throttled_periods", 0)), int(data.get("throttled_ns", 0)))


@dataclass(frozen=True)
class ProcessUsage:
    """One process's on-CPU time during the tick (all threads, all CPUs)."""

    pid: int
    comm: str
    cpu_ns: int
    peak_ns: int | None  # the busiest sub-window (summed over CPUs); None: not measured
    protected: bool = False


@dataclass(frozen=True)
class Sample:
    ts: float  # wall clock at the end of the tick
    start_ns: int  # CLOCK_MONOTONIC
    end_ns: int
    source: str
    window_ns: int  # sub-window length behind peak_ns
    ncpus: int
    protected: ProtectedWaits
    usage: tuple[ProcessUsage, ...]  # processes that ran, busiest first
    blame: tuple[tuple[int, int], ...]  # (pid, ns) of others' runs while protected threads waited
    cpu_busy_ns: tuple[int, ...]  # per CPU
    processes: Mapping[int, ProcessInfo] = field(default_factory=dict)  # who the pids above are
    psi_some_us: int | None = None  # /proc/pressure/cpu "some" total during the tick
    lost: Mapping[str, int] = field(default_factory=dict)  # events the probes could not count
    limitations: tuple[str, ...] = ()  # what this source cannot show
    execs: tuple[int, ...] = ()  # processes that exec'd during the tick (when the collector tracks them)
    throttling: Throttling | None = None  # None: not measured (no cpu hierarchy, or an older recording)

    @property
    def duration_ns(self) -> int:
        return max(1, self.end_ns - self.start_ns)

    @property
    def duration_s(self) -> float:
        return self.duration_ns / 1e9

    @cached_property
    def _usage_by_pid(self) -> dict[int, ProcessUsage]:
        index: dict[int, ProcessUsage] = {}
        for entry in self.usage:
            index.setdefault(entry.pid, entry)
        return index

    @cached_property
    def _blame_by_pid(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for pid, ns in self.blame:
            index.setdefault(pid, ns)
        return index

    @cached_property
    def _governed(self) -> dict:
        return {}

    def governing(self, info: ProcessInfo, policies):
        """trees.governing(info, self.processes, policies), worked out once per tick: the engine,
        the culprit check and the metrics each ask it of the same processes. Remembered for the
        very objects asked about (`info`, `policies`), so a process known under another
        ProcessInfo, or another policy set, is worked out afresh."""
        key = (id(info), id(policies))
        found = self._governed.get(key)
        if found is not None and found[0] is info and found[1] is policies:
            return found[2]
        governed = trees.governing(info, self.processes, policies)
        self._governed[key] = (info, policies, governed)
        return governed

    def usage_of(self, pid: int) -> ProcessUsage | None:
        # An index built once: the engine and the metrics ask for each process of the tick.
        return self._usage_by_pid.get(pid)

    def blame_of(self, pid: int) -> int:
        return self._blame_by_pid.get(pid, 0)

    def blame_share(self, pid: int) -> float:
        """The part of the protected threads' total wait that `pid` was on their CPU."""
        if self.protected.wait_ns <= 0:
            return 0.0
        return self.blame_of(pid) / self.protected.wait_ns

    def cpus_used(self, entry: ProcessUsage) -> float:
        return entry.cpu_ns / self.duration_ns

    def peak_cpus(self, entry: ProcessUsage) -> float | None:
        return None if entry.peak_ns is None else entry.peak_ns / self.window_ns

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        waits = self.protected
        return {
            "version": SAMPLE_VERSION,
            "ts": self.ts,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "source": self.source,
            "window_ns": self.window_ns,
            "ncpus": self.ncpus,
            "protected": {
                "threads": waits.threads,
                "pids": list(waits.pids),
                "waits": waits.waits,
                "wakeups": waits.wakeups,
                "preemptions": waits.preemptions,
                "wait_ns": waits.wait_ns,
                "max_ns": waits.max_ns,
                "histogram": None if waits.histogram is None else [list(pair) for pair in waits.histogram],
                "blamed_ns": waits.blamed_ns,
                "unattributed_ns": waits.unattributed_ns,
                "own_ns": waits.own_ns,
                "overflow_ns": waits.overflow_ns,
            },
            "usage": [[u.pid, u.comm, u.cpu_ns, u.peak_ns, u.protected] for u in self.usage],
            "blame": [list(pair) for pair in self.blame],
            "cpu_busy_ns": list(self.cpu_busy_ns),
            "processes": {str(pid): info.to_json() for pid, info in self.processes.items()},
            "psi_some_us": self.psi_some_us,
            "lost": dict(self.lost),
            "limitations": list(self.limitations),
            "execs": list(self.execs),
            "throttling": None if self.throttling is None else self.throttling.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Sample":
        if data.get("version") != SAMPLE_VERSION:
            raise ValueError(f"unsupported sample version {data.get('version')!r} (expected {SAMPLE_VERSION})")
        waits = data["protected"]
        hist = waits.get("histogram")
        return cls(
            ts=float(data["ts"]),
            start_ns=int(data["start_ns"]),
            end_ns=int(data["end_ns"]),
            source=str(data["source"]),
            window_ns=int(data["window_ns"]),
            ncpus=int(data["ncpus"]),
            protected=ProtectedWaits(
                threads=int(waits["threads"]),
                pids=tuple(int(p) for p in waits["pids"]),
                waits=int(waits["waits"]),
                wakeups=int(waits["wakeups"]),
                preemptions=int(waits["preemptions"]),
                wait_ns=int(waits["wait_ns"]),
                max_ns=None if waits.get("max_ns") is None else int(waits["max_ns"]),
                histogram=None if hist is None else tuple((int(s), int(c)) for s, c in hist),
                blamed_ns=int(waits.get("blamed_ns", 0)),
                unattributed_ns=int(waits.get("unattributed_ns", 0)),
                own_ns=int(waits.get("own_ns", 0)),  # recordings before the split: all of it in blamed_ns
                overflow_ns=int(waits.get("overflow_ns", 0)),
            ),
            usage=tuple(
                ProcessUsage(int(pid), str(comm), int(cpu_ns), None if peak is None else int(peak), bool(protected))
                for pid, comm, cpu_ns, peak, protected in data["usage"]
            ),
            blame=tuple((int(pid), int(ns)) for pid, ns in data["blame"]),
            cpu_busy_ns=tuple(int(ns) for ns in data["cpu_busy_ns"]),
            processes={int(pid): ProcessInfo.from_json(info) for pid, info in data.get("processes", {}).items()},
            psi_some_us=None if data.get("psi_some_us") is None else int(data["psi_some_us"]),
            lost={str(k): int(v) for k, v in data.get("lost", {}).items()},
            limitations=tuple(str(item) for item in data.get("limitations", ())),
            execs=tuple(int(pid) for pid in data.get("execs", ())),
            throttling=None if data.get("throttling") is None else Throttling.from_json(data["throttling"]),
        )


def write_samples(stream: IO[str], samples: Iterable[Sample]) -> None:
    for sample in samples:
        stream.write(json.dumps(sample.to_json(), separators=(",", ":")) + "\n")
        stream.flush()


def read_samples(path: str | Path) -> Iterator[Sample]:
    """Samples from a JSON-lines recording; a bad line is a located error, not a traceback."""
    for number, data in read_json_lines(path, "a remediator sample"):
        try:
            yield Sample.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RemediatorError(f"{path}:{number}: not a remediator sample: {exc}") from None


def merge_samples(samples: list[Sample]) -> Sample:
    """One sample covering consecutive ones (e.g. 1 s reads shown every 5 s)."""
    if not samples:
        raise ValueError("nothing to merge")
    if len(samples) == 1:
        return samples[0]
    for before, after in zip(samples, samples[1:]):
        if after.start_ns != before.end_ns:
            raise ValueError("samples to merge must follow each other (a gap would skew every mean)")
    first, last = samples[0], samples[-1]
    counts: dict[int, int] = {}
    usage: dict[int, list] = {}
    blame: dict[int, int] = {}
    lost: dict[str, int] = {}
    processes: dict[int, ProcessInfo] = {}
    has_histogram = all(s.protected.histogram is not None for s in samples)
    maxima = [s.protected.max_ns for s in samples if s.protected.max_ns is not None]
    psi = [s.psi_some_us for s in samples if s.psi_some_us is not None]
    busy = [0] * max(len(s.cpu_busy_ns) for s in samples)
    for sample in samples:
        for slot, count in sample.protected.histogram or ():
            counts[slot] = counts.get(slot, 0) + count
        for entry in sample.usage:
            merged = usage.setdefault(entry.pid, [entry.comm, 0, entry.peak_ns, entry.protected])
            merged[1] += entry.cpu_ns
            if entry.peak_ns is not None:
                merged[2] = max(merged[2] or 0, entry.peak_ns)
        for pid, ns in sample.blame:
            blame[pid] = blame.get(pid, 0) + ns
        for name, value in sample.lost.items():
            lost[name] = lost.get(name, 0) + value
        for cpu, ns in enumerate(sample.cpu_busy_ns):
            busy[cpu] += ns
        processes.update(sample.processes)
    waits = [s.protected for s in samples]
    return Sample(
        ts=last.ts,
        start_ns=first.start_ns,
        end_ns=last.end_ns,
        source=last.source,
        window_ns=last.window_ns,
        ncpus=last.ncpus,
        protected=ProtectedWaits(
            threads=last.protected.threads,
            pids=last.protected.pids,
            waits=sum(w.waits for w in waits),
            wakeups=sum(w.wakeups for w in waits),
            preemptions=sum(w.preemptions for w in waits),
            wait_ns=sum(w.wait_ns for w in waits),
            max_ns=max(maxima) if maxima else None,
            histogram=tuple(sorted(counts.items())) if has_histogram else None,
            blamed_ns=sum(w.blamed_ns for w in waits),
            unattributed_ns=sum(w.unattributed_ns for w in waits),
            own_ns=sum(w.own_ns for w in waits),
            overflow_ns=sum(w.overflow_ns for w in waits),
        ),
        usage=tuple(
            ProcessUsage(pid, comm, cpu_ns, peak, protected)
            for pid, (comm, cpu_ns, peak, protected) in sorted(usage.items(), key=lambda item: item[1][1], reverse=True)
        ),
        blame=tuple(sorted(blame.items(), key=lambda item: item[1], reverse=True)),
        cpu_busy_ns=tuple(busy),
        processes=processes,
        psi_some_us=sum(psi) if psi else None,
        lost=lost,
        limitations=last.limitations,
        execs=tuple(pid for sample in samples for pid in sample.execs),
        throttling=_merge_throttling([s.throttling for s in samples]),
    )


def _merge_throttling(items: list[Throttling | None]) -> Throttling | None:
    known = [item for item in items if item is not None]
    if not known:
        return None
    return Throttling(
        cgroups=tuple(sorted({c for item in known for c in item.cgroups})),
        periods=sum(item.periods for item in known),
        throttled_periods=sum(item.throttled_periods for item in known),
        throttled_ns=sum(item.throttled_ns for item in known),
    )
