"""The collector: keeps the protected set current and turns each tick's source delta into a Sample.

The protected set is kept four ways, cheapest first: the kernel adds new threads and children of
protected processes on fork; exec events name new processes to check against the selectors within
a tick, and task events the processes renamed (prctl) or moved to another cgroup without an exec;
a rescan every few seconds catches the rest (new pids; every process every minute, and after
events were lost). Without exec events (the procfs source) every tick rescans.

A process the selectors match but whose user `[protect] users` does not name is refused, with one
warning per process; so is a child the kernel protected on fork once it runs as such a user (it
stays protected in the kernel until the next rescan finds it: the fork tracepoint cannot see uids).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Callable, Collection

from .errors import ProcessGone, RemediatorError
from .printable import printable
from .probes import TASK_MOVED, TASK_RENAMED
from .procfs import CgroupMembership, ProcessIdentity, ProcessInfo, ProcFS, ProcStat
from .throttling import ThrottleReader
from .sample import ProcessUsage, ProtectedWaits, Sample
from .schedgroups import SchedGroups
from .selectors import ProtectSelectors
from .sources import Source, TickDelta

log = logging.getLogger(__name__)

# Processes whose metadata is kept between ticks. On a busy host the top N busiest change every
# tick; a cache of only this tick's processes read ~20 new ones a tick at ~1.3 ms each (ancestors,
# exe, cmdline: bench/scale.py), where a kept one costs a stat read every rescan interval.
INFO_CACHE_MAX = 8192
# And at most this much command-line text in each of the two caches (of readings and sketches): a
# process's arguments are read up to 32 KiB (procfs.CMDLINE_MAX_BYTES), and a user's forked
# children share theirs at no cost to the user, so a count alone would let them hold gigabytes.
CACHED_CMDLINE_BYTES_MAX = 8 << 20
ANCESTRY_MAX = 4096
FULL_RESCAN_S = 60.0  # see Collector._candidates
# The same where the kernel tells of every exec, rename and cgroup move (none lost) and the
# selectors are comm and pids only: a process can then come to match only at such an event, or as
# a new pid, so judging every process (a stat each: ~30 ms at 1,000 processes, about half of what
# comm costs the daemon beyond pids) is a safety net. A process the users check refused is judged
# again at every rescan instead: a daemon exec'd as root drops its privileges a moment later.
FULL_RESCAN_WITH_EVENTS_S = 600.0
# Refused processes judged again at each rescan (a stat and a status read each); the rest wait for
# the full one. Few: a local user's look-alikes by the thousand must not cost a read each every 5 s.
REFUSED_REJUDGED_MAX = 64
# Renamed or moved processes judged in one tick (task events), the rest kept for the next ticks, up
# to CHANGED_QUEUE_MAX. Each costs the collector a stat or two and the burst watch a sketch: about
# 0.3 ms cold (bench/rename_flood.py), so 4 a tick bound what renaming processes in a loop can
# make the daemon spend to ~0.5% of a core.
CHANGED_PER_TICK_MAX = 4
CHANGED_QUEUE_MAX = 4096
CHANGED_AGAIN_AFTER_S = 5.0  # a process judged from a task event waits this long to be judged from another


def cmdline_bytes(info: ProcessInfo) -> int:
    return sum(map(len, info.cmdline))


class ReadingCache(dict):
    """pid -> (ProcessInfo, when read), counting the command-line text it holds (`cmdline_bytes`)."""

    def __init__(self) -> None:
        super().__init__()
        self.cmdline_bytes = 0

    def __setitem__(self, pid: int, entry: tuple[ProcessInfo, float]) -> None:
        self.pop(pid, None)
        self.cmdline_bytes += cmdline_bytes(entry[0])
        super().__setitem__(pid, entry)

    def __delitem__(self, pid: int) -> None:
        self.cmdline_bytes -= cmdline_bytes(self[pid][0])
        super().__delitem__(pid)

    def pop(self, pid: int, default=None):
        entry = super().pop(pid, None)
        if entry is None:
            return default
        self.cmdline_bytes -= cmdline_bytes(entry[0])
        return entry

    def clear(self) -> None:
        super().clear()
        self.cmdline_bytes = 0

    @property
    def full(self) -> bool:
        return len(self) >= INFO_CACHE_MAX or self.cmdline_bytes >= CACHED_CMDLINE_BYTES_MAX


class _AncestorMemory:
    """The collector's memory of ancestors, as ProcFS.ancestors asks it (procfs.KnownAncestors)."""

    def __init__(self, above: Callable[[ProcStat], "tuple[tuple[int, str], ...] | None"],
                 learn: Callable[[ProcStat, "tuple[tuple[int, str], ...]"], None]):
        self.above = above
        self.learn = learn


class Collector:
    def __init__(
        self,
        source: Source,
        selectors: ProtectSelectors,
        procfs: ProcFS | None = None,
        *,
        rescan_s: float = 5.0,
        top_n: int = 24,
        track_execs: bool = False,
        wall_clock: Callable[[], float] = time.time,
        mono_clock: Callable[[], float] = time.monotonic,
        throttling: ThrottleReader | None = None,
        sched_groups: SchedGroups | None = None,  # None: processes' scheduling groups are not read
    ):
        self.source = source
        self.sched_groups = sched_groups
        self.selectors = selectors
        self.procfs = procfs or ProcFS()
        self.rescan_s = rescan_s if source.has_exec_events else 0.0
        self.top_n = top_n
        self.track_execs = track_execs  # name exec'd processes in the sample (for exec-time placement)
        # How another reader (the burst watch) reads every exec'd process in the same tick (info or
        # sketch), if one does: the exec is then read so at once and its comm judged from that.
        self.exec_reader: Callable[[int], ProcessInfo | None] | None = None
        # With track_execs: which exec'd processes the sample names, judged from their sketch
        # (None: every one). Those it names are read in full.
        self.exec_wanted: Callable[[ProcessInfo], bool] | None = None
        self._execs: list[int] = []
        self.wall_clock = wall_clock
        self.mono_clock = mono_clock
        self.throttling = throttling  # reads the protected cgroups' own-quota throttling each tick
        self.protected: dict[int, set[int]] = {}  # pid -> tids
        self.protected_reason: dict[int, str] = {}
        self._protected_start: dict[int, int] = {}  # pid -> the start time of the process protected under it
        self._warned_refused: set[ProcessIdentity] = set()  # refused processes already logged
        self._untracked: dict[int, set[int]] = {}  # pid -> threads the protected map refused
        self._info_cache = ReadingCache()  # pid -> (info, when checked)
        # pid -> (start time, comm, its ancestors, when read) of the parents walked through lately
        self._ancestry: dict[int, tuple[int, str, tuple[tuple[int, str], ...], float]] = {}
        self._ancestor_memory = _AncestorMemory(self._ancestors_held, self._learn_ancestors)
        self._sketches = ReadingCache()  # pid -> (sketch, when read): see sketch()
        self._last_rescan = float("-inf")
        self._listed: set[int] | None = None  # the pids of the last rescan's listing (comm, cgroup, unit selectors)
        self._rescan_listing: list[int] | None = None  # that listing, when this tick's rescan made one
        self._last_thread_listing = float("-inf")  # see _rescan
        self._last_full_rescan = float("-inf")
        self._full_rescan_due = False  # exec events were lost: judge every process at the next rescan
        self._refused: set[int] = set()  # refused by the users check at the last rescan: judged again at the next
        self._exited: set[int] = set()  # processes found gone at the last rescan, forgotten after the next read
        self._protected_changes: tuple[int | None, int | None] = (None, None)  # see _refresh_threads
        # Processes renamed or moved to another cgroup this tick (task events): the burst watch
        # judges them again too.
        self.changed: set[int] = set()
        # Whether a cached reading's re-check also reads the uids (a policy matches on user), and
        # the processes it found running as other uids since the last sample (they join `changed`).
        self.recheck_uids = False
        self._uids_changed_since: set[int] = set()
        # Task events waiting to be judged (see _changed_processes), keyed (TASK_RENAMED or
        # TASK_MOVED, pid or tid): the queue oldest first, those judged lately until they are due
        # again, and when each was last judged.
        self._changed_queue: dict[tuple[int, int], None] = {}
        self._changed_later: dict[tuple[int, int], float] = {}
        self._changed_judged_at: dict[tuple[int, int], float] = {}
        self._cpu_count = os.cpu_count() or 1

    # -- the protected set --------------------------------------------------------------------
    def _sync_threads(self, pid: int) -> bool:
        """Protect the process's threads not yet known, forget those gone; False if the process is
        gone, or its pid now names another process (started later than the one protected): that
        one's threads are never listed, let alone protected, on the strength of the pid alone."""
        try:
            with self.procfs.hold(pid):
                start_time = self.procfs.stat(pid).start_time
                if self._protected_start.get(pid, start_time) != start_time:
                    return False
                tids = set(self.procfs.tids(pid))
        except RemediatorError:
            return False
        self._protected_start[pid] = start_time
        known = self.protected.setdefault(pid, set())
        new = tids - known
        refused: set[int] = set()
        if new:
            # Threads a full protected map refused stay out of `known`, so they are tried again
            # next tick; meanwhile they are counted (untracked_threads), never fatal.
            refused = set(self.source.protect(new) or ())
            if refused and not self._untracked:
                log.warning("the protected-thread map is full: %d threads of pid %d are not tracked (retried each tick)",
                            len(refused), pid)
        if refused:
            self._untracked[pid] = refused
        else:
            self._untracked.pop(pid, None)
        known |= new - refused
        known &= tids
        return True

    def _add_process(self, pid: int, reason: str) -> None:
        if self._sync_threads(pid):
            self.protected_reason.setdefault(pid, reason)

    def untracked_threads(self) -> int:
        """Threads of protected processes the protected map could not hold (it is full)."""
        return sum(len(tids) for tids in self._untracked.values())

    def _drop_process(self, pid: int) -> None:
        self._untracked.pop(pid, None)
        self._protected_start.pop(pid, None)
        tids = self.protected.pop(pid, set())
        self.protected_reason.pop(pid, None)
        if tids:
            self.source.unprotect(tids)

    def _warn_refused(self, refused: dict[int, tuple[ProcessInfo, str]]) -> None:
        for pid, (info, why) in refused.items():
            if info.identity not in self._warned_refused:
                self._warned_refused.add(info.identity)
                log.warning("not protecting pid %d (%s): %s", pid, printable(info.comm), why)
        if len(self._warned_refused) > 4096:
            self._warned_refused = {info.identity for info, _ in refused.values()}

    def _child_refusal(self, tgid: int) -> tuple[ProcessInfo, str] | None:
        """A child the kernel protected on fork, refused when it runs as a user `users` does not name."""
        if not self.selectors.users:
            return None
        try:
            info = self.procfs.process_info(tgid)
        except RemediatorError:
            return None
        refusal = self.selectors.user_refusal(info)
        return (info, f"child of a protected process, but it {refusal}") if refusal else None

    def _candidates(self) -> list[int] | None:
        """The processes a rescan judges against comm, cgroup and unit selectors: every process
        at a full rescan (the first, then every full_rescan_s, and after exec or task events were
        lost), else only the pids new since the last listing, those protected now and those the
        users check refused lately (up to REFUSED_REJUDGED_MAX). A process that
        execs is judged at its exec event; one that forks without exec is its parent's copy (and
        the kernel protects a protected parent's children); one renamed or moved to another
        cgroup without exec is judged at its task event where the kernel has the tracepoints
        (else it waits for the full rescan). Judging every process
        reads a file of each: 25 to 55 ms per rescan at 1,000 processes (bench/scale.py). A
        source without exec events (procfs) judges every process at each rescan: an exec in
        place keeps its pid and would not be seen otherwise."""
        if not self.selectors.lists_processes:
            return None
        listed = self.procfs.pids()
        now = self.mono_clock()
        full = (self._listed is None or self._full_rescan_due or not self.source.has_exec_events
                or now - self._last_full_rescan >= self.full_rescan_s)
        if full:
            candidates = listed
            self._last_full_rescan, self._full_rescan_due = now, False
        else:
            candidates = [pid for pid in listed if pid not in self._listed or pid in self._refused]
            candidates += [pid for pid in self.protected if pid not in self._refused]
        self._listed = set(listed)
        self._rescan_listing = listed
        return candidates

    @property
    def full_rescan_s(self) -> float:
        """How often a rescan judges every process (see FULL_RESCAN_WITH_EVENTS_S)."""
        selectors = self.selectors
        told = self.source.has_exec_events and self.source.has_task_events
        return FULL_RESCAN_WITH_EVENTS_S if told and not (selectors.cgroups or selectors.units) else FULL_RESCAN_S

    def _rescan(self) -> None:
        self._rescan_listing = None
        refused: dict[int, tuple[ProcessInfo, str]] = {}
        resolved = self.selectors.resolve(self.procfs, refused, self._candidates(), known=self._known_info)
        wanted = {pid: reason for pid, (_info, reason) in resolved.items()}
        known_tids = {tid for tids in self.protected.values() for tid in tids}
        kernel_tids = self.source.kernel_protected_tids(only_if_forked=True)
        if kernel_tids:
            stale = []
            for tid in kernel_tids - known_tids:
                try:
                    tgid = self.procfs.tgid_of(tid)
                except RemediatorError:
                    stale.append(tid)
                    continue
                if tgid in refused:
                    stale.append(tid)
                    continue
                if tgid not in wanted:
                    # Added in the kernel on fork: a child (or thread) of a protected process.
                    child_refused = self._child_refusal(tgid)
                    if child_refused:
                        refused[tgid] = child_refused
                        stale.append(tid)
                        continue
                    wanted[tgid] = self.protected_reason.get(tgid, "child of a protected process")
            if stale:
                self.source.unprotect(stale)
        for pid in set(self.protected) - set(wanted):
            if self.protected_reason.get(pid) == "child of a protected process" and self._alive(pid):
                child_refused = self._child_refusal(pid)  # e.g. a worker that changed user since
                if child_refused is None:
                    continue
                refused[pid] = child_refused
            self._drop_process(pid)
        self._warn_refused(refused)
        self._refused = set(itertools.islice(refused, REFUSED_REJUDGED_MAX))
        # A process already protected has its task directory listed only every FULL_RESCAN_S:
        # each tick compares its thread count (_refresh_threads) and lists it when the count
        # differs, and the kernel protects new threads on fork; the listing (1 ms for a 500-thread
        # service) is for the rare thread missed with the count unchanged (one exited, one new).
        now = self.mono_clock()
        list_threads = now - self._last_thread_listing >= FULL_RESCAN_S
        if list_threads:
            self._last_thread_listing = now
        for pid, reason in wanted.items():
            if pid in self.protected and not list_threads:
                self.protected_reason.setdefault(pid, reason)
            else:
                self._add_process(pid, reason)
        self._last_rescan = now

    def _alive(self, pid: int) -> bool:
        return (self.procfs.root / str(pid)).exists()

    def _handle_exec_events(self) -> None:
        for event in self.source.exec_events():
            pid = event.pid
            self._info_cache.pop(pid, None)  # exec keeps (pid, start time) but changes comm, exe, cmdline
            self._sketches.pop(pid, None)
            if self.track_execs:
                self._execs.append(pid)
            if pid in self.protected:
                self._add_process(pid, self.protected_reason.get(pid, "selector"))  # exec may change its threads
                continue
            known = None
            reader = self.exec_reader or (self._exec_first_read if self.track_execs else None)
            if reader is not None and self.selectors.comms:
                # Who it is is read in this tick anyway (the sample's exec'd processes, the burst
                # watch): read it now, and the comm selectors judge it from that, not a stat of their own.
                if reader(pid) is None:
                    continue  # gone already (or unreadable: then not protected either)
                known = self._known_info
            self._protect_if_selected(pid, known, f"exec of {event.filename}")

    def _protect_if_selected(self, pid: int, known: Callable[[int], ProcessInfo | None] | None, why: str) -> None:
        refused: dict[int, tuple[ProcessInfo, str]] = {}
        found = self.selectors.match_pid(self.procfs, pid, refused, known)
        self._warn_refused(refused)
        if refused and len(self._refused) < REFUSED_REJUDGED_MAX:
            self._refused.update(refused)  # judged again at the next rescan (a privilege drop after exec)
        if found:
            _info, reason = found
            log.debug("protecting pid %d (%s) after %s", pid, reason, why)
            self._add_process(pid, reason)

    def _changed_processes(self, delta: TickDelta) -> set[int]:
        """The processes renamed or moved to another cgroup (a moved thread stands for its
        process) to judge this tick: at most CHANGED_PER_TICK_MAX, oldest first, the rest kept
        for the next ticks. Renaming costs a process one system call and judging it costs the
        daemon a few /proc reads (and the burst watch a sketch), so:
        - a tick judges at most CHANGED_PER_TICK_MAX: a local user renaming processes in a loop
          gets a bounded budget, not the daemon's CPU;
        - a process is judged from its task events at most once per CHANGED_AGAIN_AFTER_S: one that
          retitles itself all the time (a worker naming each job) is judged at the first rename
          at once and then every few seconds, the last rename never lost;
        - one waiting holds one place however often it renames itself. Past CHANGED_QUEUE_MAX
          waiting, the queue is dropped (counted in the sample's lost events) and the next rescan
          judges every process."""
        renamed, moved = self.source.task_changes()
        now = self.mono_clock()
        queue, later, judged_at = self._changed_queue, self._changed_later, self._changed_judged_at
        for entry in [(TASK_RENAMED, pid) for pid in renamed] + [(TASK_MOVED, tid) for tid in moved - renamed]:
            last = judged_at.get(entry)
            if last is not None and now - last < CHANGED_AGAIN_AFTER_S:
                later.setdefault(entry, last + CHANGED_AGAIN_AFTER_S)
            else:
                queue.setdefault(entry, None)
        for entry in [entry for entry, due in later.items() if due <= now]:
            del later[entry]
            queue.setdefault(entry, None)
        if len(queue) + len(later) > CHANGED_QUEUE_MAX:
            delta.lost["task_events_over_cap"] = len(queue) + len(later)
            queue.clear()
            later.clear()
            self._full_rescan_due = True
            return set()
        if len(judged_at) > CHANGED_QUEUE_MAX:
            self._changed_judged_at = judged_at = {entry: when for entry, when in judged_at.items()
                                                   if now - when < CHANGED_AGAIN_AFTER_S}
        changed: set[int] = set()
        for entry in list(itertools.islice(queue, CHANGED_PER_TICK_MAX)):
            del queue[entry]
            judged_at[entry] = now
            kind, pid = entry
            if kind == TASK_MOVED and pid not in self.protected:
                try:
                    pid = self.procfs.tgid_of(pid)
                except RemediatorError:
                    continue  # gone already
            changed.add(pid)
        return changed

    def _handle_changed(self, changed: set[int]) -> None:
        """Processes renamed or moved to another cgroup (the source's task events): read afresh by
        whoever asks next, and judged against the selectors now. A protected one that no longer
        matches is released at the next rescan, as a protected process always is."""
        for pid in changed:
            self._info_cache.pop(pid, None)
            self._sketches.pop(pid, None)
            if pid not in self.protected and self.selectors.lists_processes:
                self._protect_if_selected(pid, None, "it was renamed or moved to another cgroup")

    def _refresh_threads(self) -> int:
        """Pick up threads the kernel may have missed (created before the probes loaded) and drop
        processes that are gone. The task directory is listed only when the thread count
        differs from the threads known (or some were refused): the kernel adds new threads on
        fork, and listing a 500-thread service every tick cost 1.5 ms (bench/scale.py). The
        count itself (a stat per protected process: 50 processes of a pre-forking service, 50
        stats a tick) is read only when the kernel's count of protected threads added and
        removed (Source.protected_changes) moved at one of the last two reads: a thread that
        exits leaves the task directory a little after the kernel counts it."""
        changes = self.source.protected_changes()
        quiet = changes is not None and changes == self._protected_changes[0] == self._protected_changes[1]
        self._protected_changes = (self._protected_changes[1], changes)
        if quiet and not self._untracked:
            return sum(len(tids) for tids in self.protected.values())
        threads = 0
        for pid in list(self.protected):
            try:
                count = self.procfs.thread_count(pid)
            except RemediatorError:
                self._drop_process(pid)
                continue
            if (count != len(self.protected[pid]) or pid in self._untracked) and not self._sync_threads(pid):
                self._drop_process(pid)
                continue
            threads += len(self.protected[pid])
        return threads

    def rescan_now(self) -> None:
        """Resolve the selectors again, against every process, at the next sample (e.g. after they changed)."""
        self._last_rescan = float("-inf")
        self._full_rescan_due = True

    # -- ticks --------------------------------------------------------------------------------
    def start(self) -> None:
        """Resolve the protected set and take the baseline reading (its delta is discarded)."""
        self._rescan()
        self.source.read(self.protected)
        if self.throttling is not None:
            self.throttling.read(self.protected)  # its baseline too, so the first tick's throttling is real

    def sample(self) -> Sample:
        self._handle_exec_events()
        if self.mono_clock() - self._last_rescan >= self.rescan_s:
            self._rescan()
            rescanned = True
        else:
            rescanned = False
        threads = self._refresh_threads()
        delta = self.source.read(self.protected)
        if delta.lost.get("exec_events_dropped") or delta.lost.get("task_events_dropped"):
            self._full_rescan_due = True  # a process that exec'd into a protected name, or was renamed, may be among them
        # After the read: the kernel sends one event per process per epoch, and the read closed it.
        self.changed = self._changed_processes(delta) if self.source.has_task_events else set()
        if self.changed:
            self._handle_changed(self.changed)
        if self._exited:
            # Found gone at the previous rescan and forgotten only now, after one more read: a
            # process's exit queues its last time in the probe's open epoch, which this read took.
            self.source.forget(self._exited)
            self._exited = set()
        if rescanned:
            self._exited = self._exited_since_listing(delta.live_tgids)
        sample = self._build_sample(delta, threads)
        if self._uids_changed_since:  # read afresh already: judged again by the burst watch only
            self.changed = self.changed | self._uids_changed_since
            self._uids_changed_since = set()
        return sample

    # More missing pids than this after a listing made before the read: list /proc again instead
    # of a stat each (a host where many processes exit).
    CONFIRM_MISSING_MAX = 64

    def _exited_since_listing(self, live_tgids: Collection[int]) -> set[int]:
        """The processes with probe entries that have exited: from one listing of /proc, not a stat
        per process with an entry (1,000 on a busy host). The rescan's own listing (comm, cgroup
        and unit selectors) serves when it has few missing: it was made before the read, so a
        pid missing from it may have started since, and each is confirmed gone by a stat."""
        listing = self._rescan_listing
        self._rescan_listing = None
        if listing is not None:
            missing = set(live_tgids).difference(listing)
            if len(missing) <= self.CONFIRM_MISSING_MAX:
                return {tgid for tgid in missing if not self._alive(tgid)}
        try:
            running = set(self.procfs.pids())
        except RemediatorError:
            return {tgid for tgid in live_tgids if not self._alive(tgid)}
        return set(live_tgids) - running

    def info(self, pid: int) -> ProcessInfo | None:
        """Who a pid is (None: gone). Re-checked at most every rescan: a reused pid in between is
        caught where it matters, by the executor's identity check just before any change. Burst
        detection judges every process through this cache, which leaves the tick little to read."""
        cached = self._info_cache.get(pid)
        now = self.mono_clock()
        try:
            if cached is not None:
                info, checked = cached
                if self._trusted(checked, now):
                    return info
                stat = self.procfs.stat(pid)
                # Same process and same name: a process that renames itself after exec (prctl,
                # as a Python or Java program naming itself does) must be seen under its new
                # name, or the policy that names it never matches.
                if stat.start_time == info.start_time and stat.comm == info.comm and not self._uids_changed(info):
                    info = self._with_group(info)  # setsid or a cgroup move changes it
                    self._info_cache[pid] = (info, now)
                    return info
            blocked_before = self.procfs.blocked_reads
            info, membership = self.procfs.process_info_and_cgroups(pid, known_ancestors=self._ancestor_memory)
            info = self._with_group(info, membership)
        except (ProcessGone, RemediatorError):
            self._info_cache.pop(pid, None)
            return None
        if self.procfs.blocked_reads != blocked_before:
            # Its cmdline was not read (a read blocked, or too many do): unknown now, and read
            # again next time, not kept as empty for the process's life (a cmdline policy would
            # never match it: fluentd, logstash).
            self._info_cache.pop(pid, None)
            return info
        self._info_cache[pid] = (info, now)
        return info

    def _uids_changed(self, info: ProcessInfo) -> bool:
        """Whether the process runs as other uids than `info` says, read only where it matters
        (recheck_uids). A daemon started as root that drops to its own user (setuid) sends no
        event the collector hears: without this a `user` policy would never match it, and the burst
        watch would keep it judged as root. A change counts as the process changed this tick."""
        if not self.recheck_uids:
            return False
        if self.procfs.uids(info.pid) == (info.uid, info.euid):
            return False
        self._uids_changed_since.add(info.pid)
        return True

    def _known_info(self, pid: int) -> ProcessInfo | None:
        """The cached info or sketch of `pid` while info() would take it as read, else None (not
        read here): the rescan judges new pids by comm, and a process read at its exec needs no
        stat for it."""
        now = self.mono_clock()
        for cache in (self._info_cache, self._sketches):
            cached = cache.get(pid)
            if cached is not None and self._trusted(cached[1], now):
                return cached[0]
        return None

    def _exec_first_read(self, pid: int) -> ProcessInfo | None:
        """How an exec'd process is first read for the sample's exec-time placement."""
        return self.info(pid) if self.exec_wanted is None else self.sketch(pid)

    def _exec_named(self, pid: int) -> bool:
        """Whether the sample names this exec'd process (exec_wanted, from its sketch)."""
        if self.exec_wanted is None:
            return True
        sketch = self.sketch(pid)
        return sketch is not None and self.exec_wanted(sketch)

    def sketch(self, pid: int) -> ProcessInfo | None:
        """Who a pid is as far as policies that match on comm, exe, cmdline and ancestors need
        (ProcFS.sketch; None: gone): the cached info when there is one, else a sketch, kept like
        infos are. For judging whether a policy could govern a new process (the burst watch) and
        nothing else: its cgroup, unit and user are not read. The sample and every decision take
        info(), which reads the process in full."""
        now = self.mono_clock()
        known = self._known_info(pid)
        if known is not None:
            return known
        try:
            sketch = self.procfs.sketch(pid, known_ancestors=self._ancestor_memory)
        except RemediatorError:
            self._sketches.pop(pid, None)
            return None
        if self._sketches.full:
            self._sketches.clear()  # bounded: sketched again at most once per process
        self._sketches[pid] = (sketch, now)
        return sketch

    def _trusted(self, checked: float, now: float) -> bool:
        """Whether a cached info checked at `checked` is taken as it is at `now` (see info())."""
        return now - checked < max(self.rescan_s, 1.0)

    def _ancestors_held(self, parent: ProcStat) -> tuple[tuple[int, str], ...] | None:
        """The ancestors of `parent` (its stat just read) when this collector holds that very process
        (pid, start time and comm) as checked within the interval info() trusts: from its info,
        or from a chain walked up through it lately (_ancestry)."""
        now = self.mono_clock()
        cached = self._info_cache.get(parent.pid)
        if cached is not None:
            info, checked = cached
            if info.start_time == parent.start_time and info.comm == parent.comm and self._trusted(checked, now):
                return info.ancestors
        walked = self._ancestry.get(parent.pid)
        if walked is not None:
            start_time, comm, above, checked = walked
            if start_time == parent.start_time and comm == parent.comm and self._trusted(checked, now):
                return above
        return None

    def _learn_ancestors(self, link: ProcStat, above: tuple[tuple[int, str], ...]) -> None:
        """A parent walked through (an exec loop's shell, make, a supervisor), which the collector may
        hold no info of: its next child then reads its stat alone, not the chain above it."""
        if len(self._ancestry) >= ANCESTRY_MAX:
            self._ancestry.clear()  # bounded: walked anew within one interval
        self._ancestry[link.pid] = (link.start_time, link.comm, above, self.mono_clock())

    def _trim_info_cache(self, keep) -> None:
        """Down to half the bounds, the longest unchecked first (never those this tick uses)."""
        cache = self._info_cache
        oldest_first = sorted((checked, pid) for pid, (_info, checked) in cache.items() if pid not in keep)
        for _checked, pid in oldest_first:
            if len(cache) <= INFO_CACHE_MAX // 2 and cache.cmdline_bytes <= CACHED_CMDLINE_BYTES_MAX // 2:
                break
            del cache[pid]

    def _with_group(self, info: ProcessInfo, membership: CgroupMembership | None = None) -> ProcessInfo:
        """`info` with its scheduling group, read now (`membership`: its cgroup file as just read)."""
        if self.sched_groups is None:
            return info
        group = self.sched_groups.group_of(info.pid, membership)
        return info if group == info.sched_group else dataclasses.replace(info, sched_group=group)

    def _build_sample(self, delta: TickDelta, threads: int) -> Sample:
        duration = max(1, delta.end_ns - delta.start_ns)
        ranked = sorted(delta.usage.items(), key=lambda item: item[1][0], reverse=True)
        blamed = sorted(delta.blame.items(), key=lambda item: item[1], reverse=True)
        # Metadata for who matters this tick: the busiest, the most blamed, and the protected. Not
        # for figures within the source's step (a process that barely runs shows up once in a
        # while with about a step's worth): looking each up would cost a /proc read per process
        # per tick on a host of many small processes, for figures no policy acts on.
        step = 2 * self.source.report_floor_ns
        wanted = [pid for pid, (cpu_ns, _) in ranked[: self.top_n] if cpu_ns * 200 >= duration and cpu_ns >= step]
        wanted += [pid for pid, ns in blamed[: self.top_n] if ns >= step or ns * 20 >= delta.wait_ns]
        wanted += list(self.protected)
        execs, self._execs = tuple(dict.fromkeys(self._execs)), []
        wanted += [pid for pid in execs if self._exec_named(pid)]
        processes: dict[int, ProcessInfo] = {}
        for pid in dict.fromkeys(wanted):
            info = self.info(pid)
            if info is not None:
                processes[pid] = info
        # Their ancestors too (cached like the rest): a tree policy (match.descendants) rolls a
        # child's CPU up to a matched parent that may itself be idle, and checks each link by start time.
        for info in list(processes.values()):
            for ancestor_pid, _ in info.ancestors:
                if ancestor_pid not in processes:
                    ancestor = self.info(ancestor_pid)
                    if ancestor is None:
                        break
                    processes[ancestor_pid] = ancestor
        if self._info_cache.full:
            self._trim_info_cache(keep=processes)

        usage = tuple(
            ProcessUsage(
                pid=pid,
                comm=processes[pid].comm if pid in processes else delta.comms.get(pid, "?"),
                cpu_ns=cpu_ns,
                peak_ns=peak_ns,
                protected=pid in self.protected,
            )
            for pid, (cpu_ns, peak_ns) in ranked
        )
        return Sample(
            ts=self.wall_clock(),
            start_ns=delta.start_ns,
            end_ns=delta.end_ns,
            source=self.source.name,
            window_ns=self.source.window_ns,
            ncpus=len(delta.cpu_busy_ns) or self._cpu_count,
            protected=ProtectedWaits(
                threads=threads,
                pids=tuple(sorted(self.protected)),
                waits=delta.waits,
                wakeups=delta.wakeups,
                preemptions=delta.preemptions,
                wait_ns=delta.wait_ns,
                max_ns=delta.max_ns,
                histogram=None if delta.histogram is None else tuple(sorted(delta.histogram.items())),
                blamed_ns=delta.blamed_ns,
                unattributed_ns=delta.unattributed_ns,
                own_ns=delta.own_ns,
                overflow_ns=delta.overflow_ns,
            ),
            usage=usage,
            blame=tuple(blamed),
            cpu_busy_ns=tuple(delta.cpu_busy_ns),
            processes=processes,
            psi_some_us=delta.psi_some_us,
            lost=delta.lost,
            limitations=self.source.limitations,
            execs=tuple(pid for pid in execs if pid in processes),
            throttling=self.throttling.read(self.protected) if self.throttling is not None else None,
        )

    def close(self) -> None:
        self.source.close()
