"""Burst detection's user-space half: which processes the probe counts for, and its events.

A policy with `tail.within` makes every process it governs a candidate: the probe then counts the
protected waits over the policy's threshold during which that process ran, and wakes the daemon
when enough fall within the span (probes/sched_monitor.h, burst detection). This module keeps the
candidate map current without a full /proc pass every tick: a process is judged once, when first
seen (a periodic listing of /proc finds new pids; exec events and each tick's sample name
processes sooner), and again after an exec, a rename or a move to another cgroup (the collector's
task events), which may change what it is. All of that happens at
the tick: between ticks only burst events wake the daemon (exec events do not, so a host that
execs a lot does not keep it awake), and a child the kernel made a candidate on fork is judged at
its first event.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Iterable

from .engine import BurstEvidence
from .errors import RemediatorError
from .model import Policy, PolicySet
from .probes import BurstCandidate, BurstEvent
from .procfs import ProcessIdentity, ProcessInfo, ProcFS
from .safety import exclusion_reason
from .trees import ancestors_read, governing

log = logging.getLogger(__name__)

SCAN_EVERY_S = 5.0
# The burst watch lists /proc itself only when no listing of the collector's (its rescan, every 5 s)
# came this long after the last scan: it waits a little past the period for the collector's, so
# the two fall on the same ticks however they started (one listing, not two, every 5 s: 2-4 ms
# each at 1,000 processes).
OWN_SCAN_AFTER_S = 1.5 * SCAN_EVERY_S
# New pids a listing found, judged this many a tick (oldest first; the rest wait for the next
# ticks): a user forking thousands of idle processes would otherwise have the daemon read every one
# of them in one tick. Processes that run are named by the tick's sample and judged at once.
NEW_PIDS_PER_TICK_MAX = 256
SHARED_LISTING_S = 0.1  # a listing of /proc this recent is the tick's own
# An event within this long of judging its process uses the info judged (a fork child is judged at
# its first event): reading /proc again would add ~1-5 ms to detection for nothing new. The
# executor still checks (pid, start time) just before any change.
JUDGED_INFO_FRESH_S = 1.0


def burst_policies(policies: PolicySet) -> list[Policy]:
    return [p for p in policies.policies if not p.trigger.always and p.trigger.burst_within_s is not None]


def candidate_for(policy: Policy) -> BurstCandidate:
    trigger = policy.trigger
    return BurstCandidate(
        threshold_ns=int(round((trigger.tail_above_us or 0) * 1000)),
        count=max(2, trigger.burst_waits),
        span_ns=int(round((trigger.burst_within_s or 0) * 1e9)),
    )


class BurstWatch:
    """The candidates of one source (one that can count bursts: BpfSource), kept current."""

    def __init__(self, source, procfs: ProcFS, daemon: ProcessIdentity | None, clock=time.monotonic,
                 info_of: Callable[[int], ProcessInfo | None] | None = None,
                 sketch_of: Callable[[int], ProcessInfo | None] | None = None):
        self.source = source
        self.procfs = procfs
        # Who a pid is, for judging: the collector's cached reading (Collector.info) where there is
        # one, so a process judged here is not read again when it first shows up in a tick.
        self.info_of = info_of
        # Who a new pid is as far as comm, exe, cmdline and ancestors say (Collector.sketch): enough
        # to judge it when no policy matches on cgroup, unit or user, and most new processes are
        # governed by none; a would-be candidate is then read in full.
        self.sketch_of = sketch_of
        self.daemon = daemon  # remediator's own identity: it and what it forks are never candidates
        self.clock = clock
        self.policies: PolicySet | None = None
        self._judged: dict[int, ProcessIdentity] = {}  # pid -> the identity last judged (candidate or not)
        self._candidates: dict[int, tuple[ProcessIdentity, BurstCandidate]] = {}
        self._judged_info: dict[int, tuple[ProcessInfo, float]] = {}  # candidate pid -> (info judged, when)
        self._last_scan = float("-inf")
        self._unjudged: dict[int, None] = {}  # pids a listing found, not judged yet (oldest first)
        self.events_seen = 0
        self.events_stale = 0  # events for a process that is gone or no longer a candidate
        self.left_out = 0  # candidates the probe's map could not hold at the last refresh (it is full)
        self._protected: set[int] = set()  # the protected pids as of the last refresh

    @staticmethod
    def supported(source) -> bool:
        return hasattr(source, "poll_bursts")

    def set_policies(self, policies: PolicySet) -> None:
        """New policies (start, reload): judge every process again at the next refresh."""
        self.policies = policies
        self._judged.clear()
        self._candidates.clear()
        self._judged_info.clear()
        self._unjudged.clear()
        self._last_scan = float("-inf")

    @property
    def active(self) -> bool:
        return self.policies is not None and bool(burst_policies(self.policies))

    def ancestors_of(self, info: ProcessInfo) -> dict[int, ProcessInfo]:
        """pid -> ProcessInfo of the process's ancestors, parent first, up to the first one gone: what
        trees.governing needs to find a tree policy's matched ancestor, and safety.exclusion_reason a
        worker the protected service forked (the tick has them in its sample)."""
        return ancestors_read(info, self._info)

    def _info(self, pid: int) -> ProcessInfo | None:
        """Who a pid is (None: gone): through the collector's cache where there is one, as the tick
        reads a process and its ancestors; a burst's parent chain read afresh from /proc cost about
        1 ms per ancestor on every new process (its exe and cmdline through the bounded reader)."""
        if self.info_of is not None:
            return self.info_of(pid)
        try:
            return self.procfs.process_info(pid)
        except RemediatorError:
            return None

    @property
    def reader(self) -> Callable[[int], ProcessInfo | None] | None:
        """How a new pid is read for judging (the collector's sketch or info), None when not judged."""
        if not self.active:
            return None
        assert self.policies is not None
        return self.sketch_of if self.sketch_of is not None and self.policies.judged_by_sketch else self.info_of

    def _judge(self, info: ProcessInfo, protected: Iterable[int]) -> None:
        assert self.policies is not None
        # The policy that governs it as at the tick: its own, or a tree policy's through an ancestor.
        trees = self.policies.covers_descendants
        ancestors = self.ancestors_of(info) if trees else {}
        governed = governing(info, {**ancestors, info.pid: info}, self.policies)
        policy = governed.policy if governed else None
        self._judged[info.pid] = info.identity
        wanted = policy is not None and not policy.trigger.always and policy.trigger.burst_within_s is not None
        if wanted and self.sketch_of is not None:
            # It may have been judged from a sketch: a candidate's evidence and the safety rules
            # take the whole reading (cached when it was one).
            full = self._info(info.pid)
            if full is None or full.identity != info.identity:
                self._candidates.pop(info.pid, None)
                self._judged_info.pop(info.pid, None)
                return
            info = full
        if wanted and not trees:
            ancestors = self.ancestors_of(info)  # read for a would-be candidate only: the safety rules need them
        if not wanted or exclusion_reason(info, protected, processes={**ancestors, info.pid: info}, daemon=self.daemon):
            self._candidates.pop(info.pid, None)
            self._judged_info.pop(info.pid, None)
            return
        self._candidates[info.pid] = (info.identity, candidate_for(policy))
        self._judged_info[info.pid] = (info, self.clock())

    def refresh(self, infos: Iterable[ProcessInfo], protected: Iterable[int], changed: Iterable[int] = ()) -> None:
        """Judge the processes a tick named (and those an exec changed, and those `changed`:
        renamed or moved to another cgroup, which keeps their identity), list /proc for new pids
        when due, and make the probe's map match."""
        if not self.active:
            if self._candidates:
                self._candidates.clear()
                self.source.set_burst_candidates({})
            return
        protected = self._protected = set(protected)
        judged_now: set[int] = set()
        named: list[int] = []
        for info in infos:
            named.append(info.pid)
            if self._judged.get(info.pid) != info.identity:
                self._judge(info, protected)
                judged_now.add(info.pid)
        for pid in self.source.take_exec_pids():
            # An exec changes comm, exe and cmdline: judge it again, unless it was just judged from
            # this tick's info, which the collector read after the exec (it drops a process's
            # cached info at its exec event, before the tick reads it): a fork and exec would
            # otherwise be judged twice, a tree walk each.
            if pid in judged_now:
                continue
            self._judged.pop(pid, None)
            self._judge_pid(pid, protected)
            judged_now.add(pid)
        for pid in changed:
            # A new name or cgroup may make it a candidate or end it being one (the collector
            # dropped its cached reading, so it is read afresh).
            if pid not in judged_now:
                self._judged.pop(pid, None)
                self._judge_pid(pid, protected)
        now = self.clock()
        # The collector's listing of this tick, when it made one, past half the period; our own
        # only when none came (OWN_SCAN_AFTER_S).
        shared = self.procfs.recent_pids(SHARED_LISTING_S) if now - self._last_scan >= SCAN_EVERY_S / 2 else None
        scanned = shared is not None or now - self._last_scan >= OWN_SCAN_AFTER_S
        if scanned:
            self._last_scan = now
            pids = set(shared if shared is not None else self.procfs.pids())
            for pid in list(self._judged):
                if pid not in pids:
                    del self._judged[pid]
                    self._candidates.pop(pid, None)
                    self._judged_info.pop(pid, None)
            waiting = [pid for pid in self._unjudged if pid in pids]
            self._unjudged = dict.fromkeys(waiting + sorted(pids - self._judged.keys() - self._unjudged.keys()))
        for pid in list(itertools.islice(self._unjudged, NEW_PIDS_PER_TICK_MAX)):
            del self._unjudged[pid]
            if pid not in self._judged:
                self._judge_pid(pid, protected)
        if scanned:
            # Children the kernel made candidates on fork: the processes among them judged by now
            # stay when a policy with within governs them; threads and the others go.
            inherited = self.source.inherited_burst_candidates()
            self.source.drop_burst_candidates([pid for pid in inherited
                                               if pid not in self._candidates and pid not in self._unjudged])
        for pid in protected & self._candidates.keys():
            del self._candidates[pid]
            self._judged_info.pop(pid, None)
        for pid in [pid for pid, (_info, when) in self._judged_info.items() if now - when >= JUDGED_INFO_FRESH_S]:
            del self._judged_info[pid]  # of no more use (see evidence), and a process's whole reading
        # The candidates the sample named lately (they ran) first: more than the map holds leaves
        # out the longest idle ones, so a user's thousands of idle look-alikes cannot keep a real
        # shipper out. Room is left for the children the kernel adds on fork between two scans.
        for pid in named:
            if pid in self._candidates:
                self._candidates[pid] = self._candidates.pop(pid)  # to the end: the most recent
        recent_first = list(reversed(self._candidates))
        capacity = getattr(self.source, "burst_capacity", None)
        kept = recent_first if capacity is None else recent_first[: capacity - capacity // 8]
        left_out = len(recent_first) - len(kept)
        left_out += self.source.set_burst_candidates({pid: self._candidates[pid][1] for pid in kept}) or 0
        if left_out and not self.left_out:
            log.warning("the burst candidate map is full: %d processes a policy with tail.within governs are left "
                        "to the tick (detected within its windows, not within milliseconds)", left_out)
        self.left_out = left_out

    def _judge_pid(self, pid: int, protected: set[int]) -> None:
        reader = self.reader
        info = reader(pid) if reader is not None else self._info(pid)
        if info is None:
            return
        if info.kernel_thread:
            self._judged[pid] = info.identity
            return
        self._judge(info, protected)

    def wait(self, timeout_s: float) -> list[BurstEvent]:
        return self.source.poll_bursts(timeout_s)

    def evidence(self, event: BurstEvent) -> tuple[ProcessInfo, BurstEvidence] | None:
        """Who the event names, checked to be the process judged a candidate, and what was counted."""
        self.events_seen += 1
        if event.tgid not in self._candidates and event.tgid not in self._judged:
            self._judge_pid(event.tgid, self._protected)  # a child the kernel made a candidate on fork
        judged = self._candidates.get(event.tgid)
        recent = self._judged_info.get(event.tgid)
        if recent is not None and self.clock() - recent[1] < JUDGED_INFO_FRESH_S:
            info = recent[0]
        else:
            try:
                info = self.procfs.process_info(event.tgid)
            except RemediatorError:
                info = None
        if judged is None or info is None or info.identity != judged[0]:
            self.events_stale += 1
            return None
        return info, BurstEvidence(waits=event.count, first_s=event.first_ns / 1e9, last_s=event.mono_ns / 1e9,
                                   last_wait_us=event.wait_ns / 1000)

    def candidates(self) -> dict[int, ProcessIdentity]:
        return {pid: identity for pid, (identity, _c) in self._candidates.items()}
