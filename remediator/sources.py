"""Where a tick's numbers come from: the eBPF probes, or procfs when BPF cannot load.

Each source turns its own cumulative counters into one `TickDelta` per read. The BPF arithmetic is
the pure function `bpf_delta()`, tested on hand-made snapshots; the sources around it only do I/O.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Protocol

from . import histogram
from .errors import ProcessGone, RemediatorError
from .keptfile import KeptFile
from .probes import BurstCandidate, BurstEvent, ExecEvent, ProbeSettings, ProcCpuEntry, RawSnapshot, SchedProbes
from .procfs import ProcFS, clock_ticks_per_second
from .sample import SOURCE_BPF, SOURCE_PROCFS
from .taskstats import SCHEDSTAT, TASKSTATS, SchedstatCounters, ThreadCounters, open_thread_counters

log = logging.getLogger(__name__)

# What a daemon on procfs cannot see, said on every status line, log summary and audit record:
# without a tail or blame no tail-triggered policy can act, and a host must not look protected.
PROCFS_DEGRADED = "no tail, no blame"

WAIT_READS = {
    TASKSTATS: "/proc/<tid>/schedstat and taskstats exit records (threads that end between ticks)",
    SCHEDSTAT: "/proc/<tid>/schedstat (a thread that exits between ticks loses its last wait)",
}


def procfs_limitations(counters: str = SCHEDSTAT) -> tuple[str, ...]:
    return (
        f"no run-queue latency tail: only the mean wait per timeslice from {WAIT_READS[counters]} (no histogram, p99 or max)",
        "no blame: which processes ran while the protected threads waited is unknown",
        "no sub-second bursts: CPU use is the tick's mean from /proc/<pid>/stat (10 ms resolution)",
    )


PROCFS_LIMITATIONS = procfs_limitations()


@dataclass
class TickDelta:
    start_ns: int
    end_ns: int
    waits: int = 0
    wakeups: int = 0
    preemptions: int = 0
    wait_ns: int = 0
    max_ns: int | None = None
    histogram: dict[int, int] | None = None
    blamed_ns: int = 0
    unattributed_ns: int = 0
    own_ns: int = 0
    overflow_ns: int = 0
    usage: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # tgid -> (cpu ns, peak ns)
    comms: dict[int, str] = field(default_factory=dict)
    blame: dict[int, int] = field(default_factory=dict)
    cpu_busy_ns: list[int] = field(default_factory=list)
    psi_some_us: int | None = None
    lost: dict[str, int] = field(default_factory=dict)
    # Processes with entries in the source's maps. BPF: a view of the probes' own index, not a
    # copy (a copy hashes every process's tgid, every tick, for a set read only at a rescan):
    # read it before the next read, like RawSnapshot.proc_cpu.
    live_tgids: Collection[int] = field(default_factory=set)
    cumulative_usage: dict[int, int] = field(default_factory=dict)  # tgid -> on-CPU ns so far: the next read's baseline
    credits: "RunCredits | None" = None  # the next read's baseline for runs in progress (BPF)


@dataclass
class RunCredits:
    """On-CPU time a read counted from runs still in progress. The kernel adds a run to its
    (process, cpu) entry only when it ends, and user space sees that only when the entry is read
    again, which for a process below the report floor may be ticks later: the credit is taken
    off then, so each nanosecond counts once."""

    runs: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # cpu -> (since, tgid, ns counted)
    pending: dict[tuple[int, int], int] = field(default_factory=dict)  # (tgid, cpu) -> ns counted of runs that ended

    def forget(self, tgids: Collection[int]) -> None:
        for key in [key for key in self.pending if key[0] in tgids]:
            del self.pending[key]


class Source(Protocol):
    name: str
    window_ns: int
    # A process's CPU time and blame arrive in steps of about this much (0: exact every read):
    # below it a tick's figure says little, so the collector does not look such a process up.
    report_floor_ns: int
    limitations: tuple[str, ...]
    has_exec_events: bool
    # Whether task_changes() names every process renamed or thread moved to another cgroup (lost
    # events are counted in TickDelta.lost as task_events_dropped).
    has_task_events: bool

    def protect(self, tids: Collection[int]) -> Collection[int]: ...  # returns those it could not protect
    def unprotect(self, tids: Collection[int]) -> None: ...
    def kernel_protected_tids(self, only_if_forked: bool = False) -> set[int] | None: ...
    def exec_events(self) -> list[ExecEvent]: ...
    # (processes renamed, threads moved to another cgroup) since the last call; ask after read().
    def task_changes(self) -> tuple[set[int], set[int]]: ...
    # A count that moves whenever the kernel adds or removes a protected thread (None: no such count).
    def protected_changes(self) -> int | None: ...
    def read(self, protected: Mapping[int, Collection[int]]) -> TickDelta: ...
    def forget(self, tgids: Collection[int]) -> None: ...
    def close(self) -> None: ...


def parse_psi_some_total_us(text: str) -> int | None:
    try:
        for line in text.splitlines():
            if line.startswith("some "):
                for item in line.split():
                    if item.startswith("total="):
                        return int(item[6:])
    except ValueError:
        return None
    return None


class PsiReader:
    """The PSI "some" total, read every tick through a KeptFile; None when there is none (an old
    kernel) or it cannot be read (the next read opens the file again)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = KeptFile(path)

    def read(self) -> int | None:
        try:
            return parse_psi_some_total_us(self._file.read(4096).decode(errors="replace"))
        except OSError:
            return None

    def close(self) -> None:
        self._file.close()


# -- BPF ----------------------------------------------------------------------------------------

LOST_COUNTERS = ("protected_map_full", "stale_starts", "proc_map_full", "blame_map_full", "exec_events_dropped",
                 "task_events_dropped")


def _cumulative_usage(
    snapshot: RawSnapshot, tid_to_tgid: Callable[[int], int | None]
) -> tuple[dict[int, int], dict[int, list[tuple[int, int, int]]]]:
    """Per process: cumulative on-CPU ns including runs still in progress, and the in-progress runs."""
    totals: dict[int, int] = {}
    for (tgid, _cpu), entry in snapshot.proc_cpu.items():
        totals[tgid] = totals.get(tgid, 0) + entry.total_ns
    running = _running(snapshot, tid_to_tgid)
    for tgid, runs in running.items():
        totals[tgid] = totals.get(tgid, 0) + sum(end - since for _cpu, since, end in runs)
    return totals, running


def _entries_of(snapshot: RawSnapshot, tgids: Collection[int]) -> list[ProcCpuEntry]:
    """The proc_cpu entries of these processes, through the per-process index when there is one."""
    table = snapshot.proc_cpu
    if snapshot.cpus_of is None:
        return [entry for (tgid, _cpu), entry in table.items() if tgid in tgids]
    cpus_of = snapshot.cpus_of
    return [entry for tgid in tgids for cpu in cpus_of.get(tgid, ()) if (entry := table.get((tgid, cpu))) is not None]


def _window_peaks(
    entries: Iterable[ProcCpuEntry],
    running: Mapping[int, list[tuple[int, int, int]]],
    window_ns: int,
    first_window: int,
    last_window: int,
    changed: Collection[int],
) -> dict[int, int]:
    """Per process, the largest on-CPU ns in one complete window in [first_window, last_window],
    from `entries` (those of the processes in `changed`) and the runs in progress."""
    if last_window < first_window:
        return {}
    sums: dict[int, dict[int, int]] = {}
    for entry in entries:
        tgid = entry.tgid
        for window, ns in entry.windows:
            if first_window <= window <= last_window:
                per_window = sums.setdefault(tgid, {})
                per_window[window] = per_window.get(window, 0) + ns
    for tgid, runs in running.items():
        if tgid not in changed:
            continue
        for _cpu, start, end in runs:
            low = max(first_window, start // window_ns)
            high = min(last_window, end // window_ns)
            for window in range(low, high + 1):
                overlap = min(end, (window + 1) * window_ns) - max(start, window * window_ns)
                if overlap > 0:
                    per_window = sums.setdefault(tgid, {})
                    per_window[window] = per_window.get(window, 0) + overlap
    return {tgid: max(per_window.values()) for tgid, per_window in sums.items() if per_window}


def _whole_table_usage(previous: RawSnapshot | None, current: RawSnapshot, tid_to_tgid, previous_usage,
                       delta: TickDelta) -> dict[int, list[tuple[int, int, int]]]:
    """Each process's CPU time from its cumulative total over the whole table: the first read,
    and snapshots that do not say what changed."""
    totals_now, running_now = _cumulative_usage(current, tid_to_tgid)
    delta.cumulative_usage = totals_now
    totals_before: Mapping[int, int] = {}
    if previous:
        totals_before = previous_usage if previous_usage is not None else _cumulative_usage(previous, tid_to_tgid)[0]
    for tgid, total in totals_now.items():
        used = total - totals_before.get(tgid, 0)
        if used < 0:  # the entry was dropped and recreated: count it from zero
            used = total
        if used > 0:
            delta.usage[tgid] = (used, None)
    return running_now


def _running(snapshot: RawSnapshot, tid_to_tgid) -> dict[int, list[tuple[int, int, int]]]:
    """The runs in progress at the snapshot, per process: (cpu, since, snapshot time)."""
    running: dict[int, list[tuple[int, int, int]]] = {}
    for cpu, state in enumerate(snapshot.cpus):
        if state.current_tid == 0 or state.since_ns == 0 or snapshot.mono_ns <= state.since_ns:
            continue
        tgid = tid_to_tgid(state.current_tid)
        if tgid is not None:
            running.setdefault(tgid, []).append((cpu, state.since_ns, snapshot.mono_ns))
    return running


def _credits_at(running: Mapping[int, list[tuple[int, int, int]]]) -> RunCredits:
    """The credits of a read that counted each run in progress up to its own time."""
    return RunCredits(runs={cpu: (since, tgid, end - since) for tgid, runs in running.items() for cpu, since, end in runs})


def _changed_usage(previous: RawSnapshot, current: RawSnapshot, tid_to_tgid, delta: TickDelta,
                   credits: RunCredits | None) -> dict[int, list[tuple[int, int, int]]]:
    """Each process's CPU time and blame from only the entries that changed, and the runs in
    progress: what ran costs, the processes that did not run cost nothing."""
    if credits is None:
        credits = _credits_at(_running(previous, tid_to_tgid))
    pending = dict(credits.pending)
    used: dict[int, int] = {}
    running_now = _running(current, tid_to_tgid)
    runs_now: dict[int, tuple[int, int, int]] = {}
    for tgid, runs in running_now.items():
        for cpu, since, end in runs:
            counted = credits.runs.get(cpu)
            already = counted[2] if counted is not None and counted[:2] == (since, tgid) else 0
            used[tgid] = used.get(tgid, 0) + (end - since) - already
            runs_now[cpu] = (since, tgid, end - since)
    for cpu, (since, tgid, counted) in credits.runs.items():
        if runs_now.get(cpu, (None, None))[:2] != (since, tgid):  # ended: its entry holds it, once read
            pending[(tgid, cpu)] = pending.get((tgid, cpu), 0) + counted
    for key, before in current.proc_cpu_changed.items():
        entry = current.proc_cpu.get(key)
        credit = pending.pop(key, 0)
        if entry is None:
            continue
        tgid = key[0]
        ran = entry.total_ns - (before.total_ns if before is not None else 0)
        blamed = entry.blame_ns - (before.blame_ns if before is not None else 0)
        if ran < 0 or blamed < 0:  # the entry was dropped and recreated: count it from zero
            ran, blamed = entry.total_ns, entry.blame_ns
        used[tgid] = used.get(tgid, 0) + ran - credit
        if blamed > 0:
            delta.blame[tgid] = delta.blame.get(tgid, 0) + blamed
    for tgid, ns in used.items():
        if ns > 0:
            delta.usage[tgid] = (ns, None)
    delta.credits = RunCredits(runs=runs_now, pending=pending)
    return running_now


def _blame_totals(snapshot: RawSnapshot) -> dict[int, int]:
    totals: dict[int, int] = {}
    for (tgid, _cpu), entry in snapshot.proc_cpu.items():
        if entry.blame_ns:
            totals[tgid] = totals.get(tgid, 0) + entry.blame_ns
    return totals


def bpf_delta(
    previous: RawSnapshot | None,
    current: RawSnapshot,
    tid_to_tgid: Callable[[int], int | None],
    window_ns: int,
    previous_usage: Mapping[int, int] | None = None,
    credits: RunCredits | None = None,
) -> TickDelta:
    """What happened between two cumulative snapshots (the first read compares against nothing).

    `previous_usage` and `credits` are the previous delta's `cumulative_usage` and `credits`;
    without them, they are worked out again from `previous`."""
    start_ns = previous.mono_ns if previous else current.mono_ns
    delta = TickDelta(start_ns=start_ns, end_ns=current.mono_ns)

    before = previous.totals if previous else {}
    change = {name: value - before.get(name, 0) for name, value in current.totals.items()}
    delta.waits = change.get("waits", 0)
    delta.wakeups = change.get("wakeups", 0)
    delta.preemptions = change.get("preemptions", 0)
    delta.wait_ns = change.get("wait_ns", 0)
    delta.blamed_ns = change.get("blamed_ns", 0)
    delta.unattributed_ns = change.get("unattributed_ns", 0)
    delta.own_ns = change.get("own_ns", 0)
    delta.overflow_ns = change.get("overflow_ns", 0)
    delta.lost = {name: change[name] for name in LOST_COUNTERS if change.get(name, 0) > 0}
    delta.histogram = histogram.subtract(current.histogram, previous.histogram if previous else None)
    delta.max_ns = current.max_ns

    if previous is not None and current.proc_cpu_changed is not None:
        running_now = _changed_usage(previous, current, tid_to_tgid, delta, credits)
    else:
        running_now = _whole_table_usage(previous, current, tid_to_tgid, previous_usage, delta)
        delta.credits = _credits_at(running_now)
        blame_before = _blame_totals(previous) if previous else {}
        for tgid, ns in _blame_totals(current).items():
            charged = ns - blame_before.get(tgid, 0)
            if charged < 0:
                charged = ns
            if charged > 0:
                delta.blame[tgid] = charged
    changed = set(delta.usage)
    # Windows that closed since the previous read; the one in progress waits for the next read.
    first_window = start_ns // window_ns if previous else current.mono_ns // window_ns
    last_window = current.mono_ns // window_ns - 1
    changed_entries = _entries_of(current, changed)
    peaks = _window_peaks(changed_entries, running_now, window_ns, first_window, last_window, changed)
    for tgid, (used, _) in delta.usage.items():
        delta.usage[tgid] = (used, peaks.get(tgid, 0))

    if current.proc_cpu_changed is not None and current.cpus_of is not None:
        for entry in changed_entries:
            delta.comms.setdefault(entry.tgid, entry.comm)
        delta.live_tgids = current.cpus_of.keys()
    else:
        live = set()
        for (tgid, _cpu), entry in current.proc_cpu.items():
            delta.comms.setdefault(tgid, entry.comm)
            live.add(tgid)
        delta.live_tgids = live

    cpus_before = previous.cpus if previous else []
    for cpu, state in enumerate(current.cpus):
        busy = state.busy_ns
        if state.current_tid and state.since_ns and current.mono_ns > state.since_ns:
            busy += current.mono_ns - state.since_ns
        if cpu < len(cpus_before):
            old = cpus_before[cpu]
            old_busy = old.busy_ns
            if old.current_tid and old.since_ns and previous.mono_ns > old.since_ns:
                old_busy += previous.mono_ns - old.since_ns
            busy -= old_busy
        delta.cpu_busy_ns.append(max(0, busy))
    return delta


class BpfSource:
    name = SOURCE_BPF
    limitations: tuple[str, ...] = ()
    has_exec_events = True

    def __init__(self, procfs: ProcFS, settings: ProbeSettings | None = None, psi_path: Path = Path("/proc/pressure/cpu")):
        self.procfs = procfs
        self.probes = SchedProbes(settings)
        self.window_ns = self.probes.settings.window_ns
        self.report_floor_ns = self.probes.settings.report_floor_ns
        self.psi_path = psi_path
        self._psi_reader = PsiReader(psi_path)
        self._previous: RawSnapshot | None = None
        self._previous_usage: dict[int, int] | None = None
        self._credits: RunCredits | None = None
        self._forks_at_walk: int | None = None  # the kernel's protected_forks at the last walk of its map
        self._previous_psi = self._psi_reader.read()
        self._tgid_cache: dict[int, int] = {}
        self.has_task_events = self.probes.has_task_events

    def _tid_to_tgid(self, tid: int) -> int | None:
        if tid in self._tgid_cache:
            return self._tgid_cache[tid]
        try:
            tgid = self.procfs.tgid_of(tid)
        except RemediatorError:
            return None
        if len(self._tgid_cache) > 65536:
            self._tgid_cache.clear()
        self._tgid_cache[tid] = tgid
        return tgid

    def protect(self, tids: Collection[int]) -> set[int]:
        return self.probes.protect(tids)

    def unprotect(self, tids: Collection[int]) -> None:
        self.probes.unprotect(tids)

    def kernel_protected_tids(self, only_if_forked: bool = False) -> set[int] | None:
        """The threads the kernel's protected map holds; with `only_if_forked`, None when the
        kernel added none on fork since the last such walk (as of the latest read): the walk
        costs milliseconds on a big map, and only forks add threads user space does not know."""
        forks = self._previous.totals.get("protected_forks") if self._previous is not None else None
        if only_if_forked and forks is not None and forks == self._forks_at_walk:
            return None
        self._forks_at_walk = forks
        return self.probes.protected_tids()

    def exec_events(self) -> list[ExecEvent]:
        events = self.probes.exec_events()
        for event in events:
            # exec keeps the tgid but a reused tid may now be another process's thread
            self._tgid_cache.pop(event.pid, None)
        return events

    def protected_changes(self) -> int | None:
        """Threads the kernel added to the protected set on fork, removed at exit, or could not
        add (the map full), as of the latest read: while it stays, no protected process gained
        or lost a thread, or exited. None before the first read."""
        if self._previous is None:
            return None
        totals = self._previous.totals
        return totals["protected_forks"] + totals["protected_exits"] + totals["protected_map_full"]

    def task_changes(self) -> tuple[set[int], set[int]]:
        """(processes renamed, threads moved to another cgroup: the main thread when the whole
        process moved) since the last call."""
        return self.probes.task_changes()

    # burst detection (remediator/burstwatch.py): only this source has it
    def set_burst_candidates(self, candidates: Mapping[int, BurstCandidate]) -> int:
        return self.probes.set_burst_candidates(dict(candidates))

    @property
    def burst_capacity(self) -> int:
        """How many candidates the probe's map holds (set_burst_candidates leaves the rest out)."""
        return self.probes.settings.max_burst_candidates

    def poll_bursts(self, timeout_s: float) -> list[BurstEvent]:
        return self.probes.poll(timeout_s)

    def take_exec_pids(self) -> list[int]:
        return self.probes.take_exec_pids()

    def inherited_burst_candidates(self) -> set[int]:
        return self.probes.inherited_burst_candidates()

    def drop_burst_candidates(self, tgids: Collection[int]) -> None:
        self.probes.drop_burst_candidates(tgids)

    def read(self, protected: Mapping[int, Collection[int]]) -> TickDelta:
        current = self.probes.snapshot()
        delta = bpf_delta(self._previous, current, self._tid_to_tgid, self.window_ns, self._previous_usage, self._credits)
        self._previous, self._previous_usage, self._credits = current, delta.cumulative_usage, delta.credits
        psi = self._psi_reader.read()
        if psi is not None and self._previous_psi is not None:
            delta.psi_some_us = max(0, psi - self._previous_psi)
        self._previous_psi = psi
        return delta

    def forget(self, tgids: Collection[int]) -> None:
        self.probes.forget_processes(tgids, range(self.probes.possible_cpus))
        if self._credits is not None:
            self._credits.forget(tgids)
        for tid in [tid for tid, tgid in self._tgid_cache.items() if tgid in tgids]:
            del self._tgid_cache[tid]

    def close(self) -> None:
        self._psi_reader.close()
        self.probes.close()


# -- procfs fallback ----------------------------------------------------------------------------


class ProcfsSource:
    """The fallback: per-thread run-queue wait from taskstats or schedstat (`counters`, schedstat by
    default), CPU time from /proc, PSI."""

    name = SOURCE_PROCFS
    has_exec_events = False
    has_task_events = False

    def __init__(self, procfs: ProcFS, psi_path: Path = Path("/proc/pressure/cpu"), clock: Callable[[], int] = time.monotonic_ns,
                 counters: ThreadCounters | None = None):
        self.procfs = procfs
        self.counters = counters or SchedstatCounters(procfs)
        self.limitations = procfs_limitations(self.counters.name)
        self._dropped = self.counters.dropped
        self.psi_path = psi_path
        self._psi_reader = PsiReader(psi_path)
        self.clock = clock
        self.window_ns = 0
        self.report_floor_ns = 0
        self.tick_ns = int(1e9 / clock_ticks_per_second())
        self._thread_waits: dict[int, tuple[int, int]] = {}  # tid -> (run_delay ns, timeslices)
        self._process_cpu: dict[int, tuple[int, int]] = {}  # pid -> (start_time, utime + stime ticks)
        self._cpu_busy: list[int] | None = None
        self._psi = self._psi_reader.read()
        self._last_ns: int | None = None

    def protect(self, tids: Collection[int]) -> set[int]:
        return set()  # nothing to tell the kernel: the tids are read each tick

    def unprotect(self, tids: Collection[int]) -> None:
        pass  # baselines live until the next read, which counts an exited thread's last wait from its exit record

    def kernel_protected_tids(self, only_if_forked: bool = False) -> set[int] | None:
        return None

    def exec_events(self) -> list[ExecEvent]:
        return []

    def task_changes(self) -> tuple[set[int], set[int]]:
        return set(), set()  # every tick judges every process (the collector's rescan_s is 0 here)

    def protected_changes(self) -> int | None:
        return None  # no kernel set: the collector reads each protected process's thread count every tick

    def _read_busy(self) -> list[int]:
        busy = []
        for line in (self.procfs.root / "stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                fields = [int(value) for value in line.split()[1:]]
                # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
                busy.append((sum(fields[:8]) - fields[3] - fields[4]) * self.tick_ns)
        return busy

    def read(self, protected: Mapping[int, Collection[int]]) -> TickDelta:
        now = self.clock()
        delta = TickDelta(start_ns=self._last_ns if self._last_ns is not None else now, end_ns=now)
        first = self._last_ns is None
        self._last_ns = now

        exited = self.counters.exited()
        seen_threads: dict[int, tuple[int, int]] = {}
        counted: set[int] = set()

        def count(tid: int, wait_ns: int, slices: int) -> None:
            counted.add(tid)
            old = self._thread_waits.get(tid)
            if old is None and first:
                return
            old_wait, old_slices = old or (0, 0)
            delta.wait_ns += max(0, wait_ns - old_wait)
            delta.waits += max(0, slices - old_slices)

        for pid, tids in protected.items():
            for tid in tids:
                try:
                    _run, wait_ns, slices = self.counters.read(pid, tid)
                except RemediatorError:
                    if tid in exited:  # ended after the collector listed it
                        _run, wait_ns, slices = exited[tid]
                        count(tid, wait_ns, slices)
                    continue
                seen_threads[tid] = (wait_ns, slices)
                count(tid, wait_ns, slices)
        # Threads read last tick that ended since: their exit record holds the wait they had left.
        for tid in self._thread_waits.keys() - counted:
            if tid in exited:
                _run, wait_ns, slices = exited[tid]
                count(tid, wait_ns, slices)
        self._thread_waits = seen_threads
        if self.counters.dropped > self._dropped:
            delta.lost["taskstats_exits_dropped"] = self.counters.dropped - self._dropped
            self._dropped = self.counters.dropped

        seen_processes: dict[int, tuple[int, int]] = {}
        live: set[int] = set()
        for pid in self.procfs.pids():
            try:
                stat = self.procfs.stat(pid)
            except (ProcessGone, RemediatorError):
                continue
            ticks = stat.utime + stat.stime
            seen_processes[pid] = (stat.start_time, ticks)
            delta.comms[pid] = stat.comm
            live.add(pid)
            old = self._process_cpu.get(pid)
            if first:
                continue
            used = ticks - old[1] if old and old[0] == stat.start_time else ticks
            if used > 0:
                delta.usage[pid] = (used * self.tick_ns, None)
        self._process_cpu = seen_processes
        delta.live_tgids = live

        busy = self._read_busy()
        if self._cpu_busy is not None and not first:
            delta.cpu_busy_ns = [max(0, now_busy - old) for now_busy, old in zip(busy, self._cpu_busy)]
        else:
            delta.cpu_busy_ns = [0] * len(busy)
        self._cpu_busy = busy

        psi = self._psi_reader.read()
        if psi is not None and self._psi is not None and not first:
            delta.psi_some_us = max(0, psi - self._psi)
        self._psi = psi
        return delta

    def forget(self, tgids: Collection[int]) -> None:
        pass

    def close(self) -> None:
        self._psi_reader.close()
        self.counters.close()


def open_procfs_source(procfs: ProcFS) -> ProcfsSource:
    """The fallback with taskstats where the kernel offers it, else schedstat (the limitations say which)."""
    counters, why_not = open_thread_counters(procfs)
    if why_not:
        log.info("procfs source: run-queue waits from schedstat, not taskstats: %s", why_not)
    return ProcfsSource(procfs, counters=counters)


def open_source(procfs: ProcFS, *, want: str = "auto", settings: ProbeSettings | None = None) -> tuple[Source, str | None]:
    """The best source available: (source, why BPF is not used or None). want: auto | bpf | procfs."""
    if want == SOURCE_PROCFS:
        return open_procfs_source(procfs), None
    try:
        return BpfSource(procfs, settings), None
    except RemediatorError as exc:
        if want == SOURCE_BPF:
            raise
        return open_procfs_source(procfs), str(exc)

