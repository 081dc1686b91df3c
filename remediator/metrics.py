"""Prometheus metrics: the numbers a fleet watches, fed by the tick like the audit log.

`Metrics` is a tick observer (see tick.py) holding its own CollectorRegistry; the daemon serves it
on a loopback address (`MetricsServer`) and/or writes it for node_exporter's textfile collector
(`TextfileWriter`); `remediator replay --metrics FILE` writes what the daemon would have exported
after a recording. Every label is bounded: policies, steps, results, reasons and probes come from
the config and the code; offender comms (any process can choose its own) get a series of their own
for the first `offender_labels` comms of processes a policy governs that earn one, as many again for
processes no policy names, and all others count under "other". Two sets of places, so that processes
no policy names cannot take the places of the offenders the policies are about.
"""

from __future__ import annotations

import errno
import functools
import io
import selectors
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from . import histogram
from .model import Outcome
from .trustedfs import Trust, TrustedDirectory, open_output

DEFAULT_OFFENDER_LABELS = 20
OTHER = "other"
NO_POLICY = "none"
# An offender comm earns its own series once it has been blamed for this much (while counted under
# "other"): a comm that was on the protected CPUs for a moment must not take one of the N places.
OFFENDER_LABEL_MIN_S = 0.01
PENDING_COMMS_MAX = 4096  # comms still under the bar remembered at once, per set of places
# The probe's histogram is log-linear: 8 buckets per power of two, so every power of two is one of
# its bucket bounds and folding into these loses nothing but resolution. 2**10 ns (1 us) .. 2**31 ns (2.1 s).
WAIT_BUCKETS_NS = tuple(1 << k for k in range(10, 32))
TICK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Ticks kept before they are counted in without a scrape (10 s at the default 250 ms tick).
FOLD_EVERY = 40
TAIL_PERCENTILES = (99.0,)  # exported besides every percentile a loaded policy's trigger uses
MODES = ("live", "dry-run", "replay")
REFUSAL_KINDS = ("excluded", "capped", "infeasible", "skipped")  # the engine's decisions not to act
SOURCES = ("bpf", "procfs")


def _percentile_label(percentile: float) -> str:
    return f"{percentile:g}"


def _step_text(policy, index: int | None) -> str:
    if policy is None or index is None or not 0 <= index < len(policy.steps):
        return "none"
    return policy.steps[index].describe()


@functools.cache
def _bucket_of_slot() -> tuple[int | None, ...]:
    """For each probe slot, the first Prometheus bucket that holds all of it (None: only +Inf)."""
    found = []
    for slot in range(histogram.SLOTS):
        _low, high = histogram.slot_bounds(slot)
        found.append(next((index for index, bound in enumerate(WAIT_BUCKETS_NS) if high <= bound), None))
    return tuple(found)


class _WaitHistogram:
    """The protected threads' run-queue waits as a cumulative Prometheus histogram, fed a tick's
    probe buckets at a time (observing each wait one by one would cost a call per wakeup)."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self.buckets = [0] * len(WAIT_BUCKETS_NS)  # waits of at most WAIT_BUCKETS_NS[i] (not cumulative)
        self.count = 0
        self.sum_ns = 0

    def add(self, counts: dict[int, int], wait_ns: int) -> None:
        bucket_of = _bucket_of_slot()
        for slot, count in counts.items():
            if count <= 0:
                continue
            index = bucket_of[slot] if 0 <= slot < len(bucket_of) else None
            if index is not None:
                self.buckets[index] += count
            self.count += count
        self.sum_ns += wait_ns

    def collect(self):
        with self._lock:
            cumulative, rows = 0, []
            for bound, count in zip(WAIT_BUCKETS_NS, self.buckets):
                cumulative += count
                rows.append((repr(bound / 1e9), cumulative))
            rows.append(("+Inf", self.count))
            total_s = self.sum_ns / 1e9
        family = HistogramMetricFamily(
            "remediator_protected_run_queue_wait_seconds",
            "Run-queue waits of the protected threads (from wakeup or preemption to running), from the probe's histogram.",
            buckets=rows, sum_value=total_s)
        yield family

    def describe(self):
        return self.collect()


class _CommPlaces:
    """Up to `size` offender comms with a series of their own: the first that are blamed for
    OFFENDER_LABEL_MIN_S in all (while counted under "other") keep one for good."""

    def __init__(self, size: int):
        self.size = size
        self.labelled: set[str] = set()
        self._pending_s: dict[str, float] = {}  # blame of comms under the bar so far

    def earn(self, comm: str, seconds: float) -> bool:
        """Whether `comm` has a place now that it was blamed `seconds` more."""
        if comm in self.labelled:
            return True
        if len(self.labelled) >= self.size:
            return False
        so_far = self._pending_s.get(comm, 0.0) + seconds
        if so_far >= OFFENDER_LABEL_MIN_S:
            self.labelled.add(comm)
            self._pending_s.pop(comm, None)
            return True  # from now on; what it had before stays in "other" (counters never go down)
        if len(self._pending_s) >= PENDING_COMMS_MAX:
            self._pending_s.clear()  # bounded: a host of short-lived comms must not grow this
        self._pending_s[comm] = so_far
        return False


class _FoldingRegistry(CollectorRegistry):
    """A registry that counts in the ticks not yet counted (`fold`) before any series is read: a
    scrape, a filtered scrape (`?name[]=`) and a textfile write all collect through here."""

    def __init__(self, fold):
        super().__init__()
        self._fold = fold

    def collect(self):
        self._fold()
        yield from super().collect()

    def restricted_registry(self, names):
        self._fold()
        return super().restricted_registry(names)


class Metrics:
    """The tick observer that keeps the metrics. Thread-safe: the HTTP server's threads collect
    while the loop updates (prometheus_client locks each value; the histogram holds `_lock`).

    A tick's report is only kept (on_tick); the reports are counted in together when the metrics
    are read (a scrape, the textfile) or every FOLD_EVERY ticks. Counting one tick in touches
    every series' objects, cold in the CPU caches after the sleep between ticks: a batch pays
    that once (bench/scale.py). What a scrape sees is the same: every tick up to the last."""

    def __init__(self, offender_labels: int = DEFAULT_OFFENDER_LABELS, *, own_process: bool = False):
        self.registry = _FoldingRegistry(self.fold)
        self.offender_labels = offender_labels
        self._lock = threading.Lock()
        # Offender comms with a series of their own: those of processes a policy governs, and the
        # others. Apart, so that any local user naming processes at will cannot fill the first.
        self._governed_places = _CommPlaces(offender_labels)
        self._unnamed_places = _CommPlaces(offender_labels)
        self._tail_series: set[tuple[str, ...]] = set()
        # Set again only when they change: most ticks change none of these.
        self._mode_now: str | None = None
        self._source_now: str | None = None
        self._series_for = None  # the PolicySet the per-policy series below were made for
        self._per_policy_gauges: dict[str, tuple] = {}  # policy name -> its (active, nothing left) gauges
        self._tail_gauges: dict[float, object] = {}
        self._unfolded: list = []  # the reports of the ticks not yet counted in
        self._unfolded_lock = threading.Lock()  # the loop appends while a scrape takes them
        self._fold_lock = threading.Lock()  # one fold at a time: the loop's or a scrape's
        registry = self.registry

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=registry)

        self.mode = gauge("remediator_mode", "1 for the mode the daemon runs in (dry-run changes nothing; replay "
                          "is `remediator replay`), 0 for the others.", ("mode",))
        self.source = gauge("remediator_source", "1 for the sample source in use (bpf: the eBPF probes; procfs: the "
                            "fallback), 0 for the other.", ("source",))
        self.degraded = gauge("remediator_degraded", "1 when the source cannot see the run-queue tail or blame "
                              "(procfs): only always-policies can act.")
        self.waits = _WaitHistogram(self._lock)
        registry.register(self.waits)
        self.protected_waits = counter("remediator_protected_waits_total", "Completed run-queue waits of the "
                                       "protected threads (wakeups and preemptions).")
        self.protected_wakeups = counter("remediator_protected_wakeups_total", "Wakeups of the protected threads.")
        self.protected_processes = gauge("remediator_protected_processes", "Protected processes running.")
        self.protected_threads = gauge("remediator_protected_threads", "Threads of the protected processes.")
        self.tail = gauge("remediator_protected_tail_seconds", "The protected threads' run-queue wait at a "
                          "percentile, over the last tick (from the probe's fine histogram; NaN: no waits).",
                          ("percentile",))
        self.threshold = gauge("remediator_policy_tail_threshold_seconds", "A policy's trigger: the protected "
                               "tail above which it acts.", ("policy", "percentile"))
        self.blame_by_offender = counter("remediator_offender_blame_seconds_total", "Time others ran on a CPU "
                                         "while a protected thread waited for it, by the offender's comm (the "
                                         "first N comms of governed processes and the first N of the others to earn "
                                         f"a series; the rest under \"{OTHER}\").", ("comm",))
        self.blame_by_policy = counter("remediator_policy_blame_seconds_total", "The same blame, by the policy "
                                       f"that governs the offender (\"{NO_POLICY}\": no policy names it).", ("policy",))
        self.actions = counter("remediator_actions_total", "Ladder steps carried out, by result (applied, "
                               "would-apply in a dry run, denied, refused, gone, ...).", ("policy", "step", "result", "mode"))
        self.reverts = counter("remediator_reverts_total", "Remediations given back after a quiet period, by "
                               "the last step that was in place and the result.", ("policy", "step", "result", "mode"))
        self.verifications = counter("remediator_verifications_total", "Steps judged after their settle time: "
                                     "helped, did-not-help or inconclusive.", ("policy", "step", "verdict", "mode"))
        self.refusals = counter("remediator_refusals_total", "Actions not taken, by reason: excluded (safety "
                                "rules), capped (rate limits), infeasible, skipped (a step that cannot work on this host), refused (by "
                                "the executor).", ("reason", "policy"))
        self.exhausted = counter("remediator_ladders_exhausted_total", "Ladders whose last step was in place "
                                 "while the trigger still held.", ("policy",))
        self.active = gauge("remediator_active_remediations", "Processes with a policy's changes in place.", ("policy",))
        self.nothing_left = gauge("remediator_ladder_exhausted_while_over", "Processes whose policy's last step is "
                                  "in place while that policy's tail is over its threshold now: nothing left to do.",
                                  ("policy",))
        self.lost = counter("remediator_probe_lost_events_total", "Events the probes could not count (a full "
                            "map or ring).", ("probe",))
        self.executor_outcomes = counter("remediator_executor_outcomes_total", "Changes made or given back outside "
                                         "a decision: re-applied to new threads (maintain), restored at start-up, "
                                         "exit or a mode change.", ("when", "result"))
        self.ticks = counter("remediator_ticks_total", "Ticks run.")
        self.last_tick = gauge("remediator_last_tick_timestamp_seconds", "Wall-clock end of the last sample taken.")
        self.tick_duration = Histogram("remediator_tick_duration_seconds", "The daemon's own work per tick "
                                       "(deciding, changing, auditing), sampling excluded.",
                                       buckets=TICK_BUCKETS_S, registry=registry)
        if own_process:
            # remediator_process_cpu_seconds_total, remediator_process_resident_memory_bytes, ...
            ProcessCollector(namespace="remediator", registry=registry)

    # -- the tick's observer ------------------------------------------------------------------
    def on_decision(self, carried) -> None:
        decision, outcome, mode = carried.decision, carried.outcome, carried.mode
        policy = decision.policy
        name = policy.name if policy is not None else NO_POLICY
        if decision.kind == "act" and outcome is not None:
            self.actions.labels(name, _step_text(policy, decision.step_index), outcome.status, mode).inc()
            if outcome.status == "refused":
                self.refusals.labels("refused", name).inc()
        elif decision.kind == "revert" and outcome is not None:
            before = carried.before.remediations.get((decision.identity, name))
            step = _step_text(policy, before.step_index if before is not None else None)
            self.reverts.labels(name, step, outcome.status, mode).inc()
        elif decision.kind == "verify":
            verdict = str(decision.evidence.get("verdict", "inconclusive"))
            self.verifications.labels(name, _step_text(policy, decision.step_index), verdict, mode).inc()
        elif decision.kind in REFUSAL_KINDS:
            self.refusals.labels(decision.kind, name).inc()
        elif decision.kind == "exhausted":
            self.exhausted.labels(name).inc()

    def on_outcome(self, when: str, outcome: Outcome, mode: str) -> None:
        self.executor_outcomes.labels(when, outcome.status).inc()

    def on_tick(self, report) -> None:
        with self._unfolded_lock:
            self._unfolded.append(report)
            due = len(self._unfolded) >= FOLD_EVERY
        if due:
            self.fold()

    @property
    def unfolded(self) -> int:
        """Ticks kept but not yet counted in (at most FOLD_EVERY - 1 after a tick)."""
        return len(self._unfolded)

    def fold(self) -> None:
        """Count in the ticks not yet counted, in order. The gauges take the last tick's values."""
        with self._fold_lock:
            with self._unfolded_lock:
                reports, self._unfolded = self._unfolded, []
            if not reports:
                return
            waits_total = wakeups_total = 0
            lost: dict[str, int] = {}
            blame_by_offender: dict[str, float] = {}
            blame_by_policy: dict[str, float] = {}
            for report in reports:
                waits = report.sample.protected
                if waits.histogram is not None:
                    with self._lock:
                        self.waits.add(waits.counts(), waits.wait_ns)
                waits_total += waits.waits
                wakeups_total += waits.wakeups
                self._blame(report.sample, report.policies, blame_by_offender, blame_by_policy)
                for probe, count in report.sample.lost.items():
                    if count > 0:
                        lost[probe] = lost.get(probe, 0) + count
                if report.duration_s > 0:
                    self.tick_duration.observe(report.duration_s)
            last = reports[-1]
            sample = last.sample
            self.set_mode(last.mode)
            if sample.source != self._source_now:
                for source in SOURCES:
                    self.source.labels(source).set(1 if sample.source == source else 0)
                self.degraded.set(1 if sample.source == "procfs" else 0)
                self._source_now = sample.source
            self.protected_waits.inc(waits_total)
            self.protected_wakeups.inc(wakeups_total)
            self.protected_processes.set(len(sample.protected.pids))
            self.protected_threads.set(sample.protected.threads)
            for offender, seconds in blame_by_offender.items():
                self.blame_by_offender.labels(offender).inc(seconds)
            for name, seconds in blame_by_policy.items():
                self.blame_by_policy.labels(name).inc(seconds)
            for probe, count in lost.items():
                self.lost.labels(probe).inc(count)
            self._per_policy(sample, last.policies, last.state)
            self.ticks.inc(len(reports))
            self.last_tick.set(sample.ts)

    # -- parts --------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode == self._mode_now:
            return
        for each in MODES:
            self.mode.labels(each).set(1 if each == mode else 0)
        self._mode_now = mode

    def _offender(self, comm: str, seconds: float, governed: bool) -> str:
        if comm in self._governed_places.labelled or comm in self._unnamed_places.labelled:
            return comm  # a comm keeps its series whichever process of that name is blamed
        places = self._governed_places if governed else self._unnamed_places
        return comm if places.earn(comm, seconds) else OTHER

    def _blame(self, sample, policies, by_offender: dict[str, float], by_policy: dict[str, float]) -> None:
        # Summed per series first: a busy host blames dozens of processes a tick, a handful of series.
        for pid, ns in sample.blame:
            if ns <= 0:
                continue
            seconds = ns / 1e9
            info = sample.processes.get(pid)
            usage = None if info is not None else sample.usage_of(pid)
            comm = info.comm if info is not None else usage.comm if usage is not None else "?"
            found = sample.governing(info, policies) if info is not None else None  # a tree policy's too
            offender = self._offender(comm, seconds, governed=bool(found))
            by_offender[offender] = by_offender.get(offender, 0.0) + seconds
            name = found.policy.name if found else NO_POLICY
            by_policy[name] = by_policy.get(name, 0.0) + seconds

    def _policy_series(self, policies) -> None:
        """The series that depend on the policies alone: made again only when they were (re)loaded."""
        names = {policy.name for policy in policies.policies}
        for gone in self._per_policy_gauges.keys() - names:  # a reload dropped the policy: its gauges go too
            for metric in (self.active, self.nothing_left):
                metric.remove(gone)
        percentiles = set(TAIL_PERCENTILES)
        thresholds = set()
        for policy in policies.policies:
            trigger = policy.trigger
            if trigger.always or trigger.tail_above_us is None:
                continue
            percentile = trigger.tail_percentile or 99.0
            percentiles.add(percentile)
            thresholds.add((policy.name, _percentile_label(percentile)))
            self.threshold.labels(policy.name, _percentile_label(percentile)).set(trigger.tail_above_us / 1e6)
        for stale in self._tail_series - thresholds:
            self.threshold.remove(*stale)
        self._tail_series = thresholds
        self._per_policy_gauges = {name: (self.active.labels(name), self.nothing_left.labels(name)) for name in names}
        self._tail_gauges = {percentile: self.tail.labels(_percentile_label(percentile)) for percentile in percentiles}
        self._series_for = policies

    def _per_policy(self, sample, policies, state) -> None:
        if policies is not self._series_for:
            self._policy_series(policies)
        now = sample.end_ns / 1e9
        gauges = self._per_policy_gauges
        active: dict[str, int] = dict.fromkeys(gauges, 0)
        stuck: dict[str, int] = dict.fromkeys(gauges, 0)
        for remediation in state.remediations.values():
            if not remediation.applied or remediation.policy not in gauges:
                continue
            active[remediation.policy] += 1
            policy = policies.by_name(remediation.policy)
            if remediation.step_index >= len(policy.steps) - 1 and state.last_over.get(policy.name) == now:
                stuck[policy.name] += 1
        for name, (active_gauge, stuck_gauge) in gauges.items():
            active_gauge.set(active[name])
            stuck_gauge.set(stuck[name])
        for percentile, gauge in self._tail_gauges.items():
            value = sample.protected.percentile_ns(percentile)
            gauge.set(float("nan") if value is None else value / 1e9)

    def text(self) -> bytes:
        """The Prometheus text format, as /metrics serves it."""
        return generate_latest(self.registry)


# -- serving ----------------------------------------------------------------------------------

# A connection gets this long in all, from accept to the last byte of the answer: the request line,
# the headers and the answer. A scrape on loopback takes milliseconds; a client that trickles its
# request a byte at a time is cut off here, however long it would keep going.
CONNECTION_DEADLINE_S = 5.0
# Requests answered at once, each on a thread of its own while it lasts (at most the deadline).
MAX_CONNECTIONS = 8
# Connections not answered yet (still sending their request, or sent and waiting for a place):
# held by the accepting thread alone (a descriptor and what they sent, no thread), this many at
# most; one more closes the one accepted first, one still sending before one waiting for a place.
MAX_WAITING = 64
# An answer still being written after this long has a client that does not read it: when a
# complete request waits for a place, that connection is cut off for it.
STALLED_S = 1.0
# What a request may send (request line and headers): a scrape sends a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_ENDS = (b"\r\n\r\n", b"\n\n")  # the blank line after the headers (a bare \n is tolerated, as wsgiref does)
# How often the accepting thread looks again while a complete request waits for a place (a place
# that frees wakes it at once): only for an answer that stalls.
PLACE_RETRY_S = 0.1
# Out of descriptors (EMFILE, ENFILE): the listening socket rests this long, so the thread does not
# spin on a connection it cannot accept; the kernel keeps it queued meanwhile.
ACCEPT_REST_S = 0.1


class _CutOff(ConnectionAbortedError):
    """A connection past its deadline or its byte budget. A ConnectionAbortedError, so that wsgiref
    drops it as quietly as a client that went away, with no traceback in the journal."""


class _DeadlineSocket(io.RawIOBase):
    """A connection's socket as a file whose reads and writes all end by one deadline (each call
    may block only for the time left), whose reads give `received` (what the accepting thread
    read) first, and stop at `max_read` bytes in all."""

    def __init__(self, sock: socket.socket, deadline: float, max_read: int, received: bytes = b""):
        self._sock = sock
        self._deadline = deadline
        self._received = received
        self._left_to_read = max_read - len(received)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def _block_at_most_the_time_left(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _CutOff("past the connection's deadline")
        self._sock.settimeout(left)

    def readinto(self, buffer) -> int:
        if self._received:
            count = min(len(buffer), len(self._received))
            buffer[:count] = self._received[:count]
            self._received = self._received[count:]
            return count
        if self._left_to_read <= 0:
            raise _CutOff(f"a request longer than {MAX_REQUEST_BYTES} bytes")
        self._block_at_most_the_time_left()
        try:
            received = self._sock.recv_into(memoryview(buffer)[:self._left_to_read])
        except TimeoutError:
            raise _CutOff("past the connection's deadline") from None
        self._left_to_read -= received
        return received

    def write(self, data) -> int:
        self._block_at_most_the_time_left()
        try:
            self._sock.sendall(data)  # the timeout bounds the whole sendall, not each send
        except TimeoutError:
            raise _CutOff("past the connection's deadline") from None
        return len(data)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        # In place of StreamRequestHandler's per-call timeout: one deadline for the whole connection.
        self.connection = self.request
        received, accepted_at = self.server.take_received(self.request)
        stream = _DeadlineSocket(self.request, accepted_at + self.server.deadline_s, MAX_REQUEST_BYTES, received)
        self.rfile = io.BufferedReader(stream)
        self.wfile = stream

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # a scrape every 15 s is not news for the journal


class _Waiting:
    """A connection not answered yet (still sending its request, or waiting for a place), held by
    the accepting thread."""

    __slots__ = ("sock", "address", "accepted_at", "received")

    def __init__(self, sock: socket.socket, address, accepted_at: float):
        self.sock, self.address, self.accepted_at, self.received = sock, address, accepted_at, bytearray()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread accepts and reads every request line and headers, without a thread per
    connection; only a complete request gets a thread of its own to be answered on, at most
    `max_connections` at once. Each connection gets `deadline_s` from accept to the last byte.

    So a local user's connections that never send a request, or trickle it, hold a descriptor each
    and no place; with those waiting for a place they are `max_waiting` at most, the first accepted
    closed for one more. A scrape, which sends its request as it connects, is answered as soon as
    it is in, the newest complete request first. A client that sends a request and does not read the
    answer holds its place until its deadline, or `STALLED_S` once a complete request waits for it.
    Connections by the thousand cost no thread, no memory kept and no more descriptors."""

    daemon_threads = True  # a handler never holds up the daemon's exit
    block_on_close = False  # and keeps no list of its threads
    # Connections the kernel queues before accept: a scrape's SYN dropped behind a flood waits a second.
    request_queue_size = 128

    def __init__(self, address, deadline_s: float, max_connections: int, max_waiting: int = MAX_WAITING):
        self.deadline_s = deadline_s
        self.max_connections = max_connections
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._answering: dict[socket.socket, float] = {}  # connection -> when its answer began (under _lock)
        self._received: dict[socket.socket, tuple[bytes, float]] = {}  # handed to its thread (under _lock)
        self._waiting: dict[socket.socket, _Waiting] = {}  # the accepting thread's alone, oldest first
        self._complete: list[_Waiting] = []  # complete requests waiting for a place, oldest first
        self._stopping = False
        self._stopped = threading.Event()
        self._accept_rests_until: float | None = None  # out of descriptors: see ACCEPT_REST_S
        self._wake, self._waker = socket.socketpair()
        self.closed_waiting = 0  # connections closed unanswered for a newer one (MAX_WAITING)
        self.cut_off_stalled = 0  # answers cut off for a complete request
        self.unstarted = 0  # complete requests closed unanswered: no thread could be started
        super().__init__(address, _QuietHandler)
        self.socket.setblocking(False)

    # -- the accepting thread ----------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                selector.register(self._wake, selectors.EVENT_READ)
                while not self._stopping:
                    events = selector.select(self._timeout(poll_interval))
                    now = time.monotonic()
                    incoming = False
                    for key, _ in events:
                        if key.fileobj is self.socket:
                            incoming = True
                        elif key.fileobj is self._wake:
                            self._wake.recv(64)
                        else:
                            self._receive(selector, key.fileobj)
                    # Requests in first, then the newcomers: one more can close the oldest waiting.
                    if incoming:
                        self._accept(selector, now)
                    if self._accept_rests_until is not None and now >= self._accept_rests_until:
                        selector.register(self.socket, selectors.EVENT_READ)
                        self._accept_rests_until = None
                    self._expire(selector, now)
                    self._place_complete(now)
        finally:
            for waiting in [*self._waiting.values(), *self._complete]:
                waiting.sock.close()
            self._waiting.clear()
            self._complete.clear()
            self._stopped.set()

    def _timeout(self, poll_interval: float) -> float:
        if self._complete:
            return PLACE_RETRY_S
        if self._accept_rests_until is not None:
            return ACCEPT_REST_S
        if self._waiting:
            first = next(iter(self._waiting.values()))
            return max(0.0, min(poll_interval, first.accepted_at + self.deadline_s - time.monotonic()))
        return poll_interval

    def _accept(self, selector, now: float) -> None:
        for _ in range(self.max_waiting):  # a bounded batch: the requests in are read between batches
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and the like: the kernel keeps the connection queued, and the listening
                # socket stays readable; it rests, or this thread would spin on it.
                selector.unregister(self.socket)
                self._accept_rests_until = now + ACCEPT_REST_S
                return
            sock.setblocking(False)
            if len(self._waiting) + len(self._complete) >= self.max_waiting:
                if self._waiting:
                    self._drop(selector, next(iter(self._waiting)))
                else:
                    self._complete.pop(0).sock.close()
                self.closed_waiting += 1
            self._waiting[sock] = _Waiting(sock, address, now)
            selector.register(sock, selectors.EVENT_READ)

    def _receive(self, selector, sock: socket.socket) -> None:
        waiting = self._waiting.get(sock)
        if waiting is None:
            return
        try:
            chunk = sock.recv(MAX_REQUEST_BYTES - len(waiting.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, sock)  # gone before its request was in
            return
        searched_from = max(0, len(waiting.received) - 3)
        waiting.received += chunk
        if any(waiting.received.find(end, searched_from) >= 0 for end in REQUEST_ENDS):
            selector.unregister(sock)
            del self._waiting[sock]
            self._complete.append(waiting)
        elif len(waiting.received) >= MAX_REQUEST_BYTES:
            self._drop(selector, sock)  # a request longer than any scrape's: never answered

    def _drop(self, selector, sock: socket.socket) -> None:
        selector.unregister(sock)
        del self._waiting[sock]
        sock.close()

    def _expire(self, selector, now: float) -> None:
        while self._waiting:
            sock, waiting = next(iter(self._waiting.items()))
            if now - waiting.accepted_at < self.deadline_s:
                break
            self._drop(selector, sock)  # its request never came in time

    def _place_complete(self, now: float) -> None:
        """Hand complete requests to threads, the newest first (a flood of requests queued before
        a scrape does not make it wait), while places are free; with none free, cut off an answer
        stalled past STALLED_S, and look again shortly."""
        in_time = []
        for waiting in self._complete:
            if now - waiting.accepted_at < self.deadline_s:
                in_time.append(waiting)
            else:
                waiting.sock.close()  # past its deadline before a place freed
        self._complete = in_time
        while self._complete:
            waiting = self._complete[-1]
            with self._lock:
                if len(self._answering) >= self.max_connections:
                    self._cut_off_a_stalled_answer(now)
                    return  # its place frees when its thread ends
                self._answering[waiting.sock] = now
                self._received[waiting.sock] = (bytes(waiting.received), waiting.accepted_at)
            self._complete.pop()
            try:
                self.process_request(waiting.sock, waiting.address)
            except Exception:  # no thread started (TasksMax, memory): this one is not answered
                self._answered(waiting.sock)
                waiting.sock.close()
                self.unstarted += 1

    def _cut_off_a_stalled_answer(self, now: float) -> None:
        """Under _lock."""
        stalled = [(began, sock) for sock, began in self._answering.items() if now - began >= STALLED_S]
        if not stalled:
            return
        _, sock = min(stalled, key=lambda item: item[0])
        self._answering[sock] = float("inf")  # never chosen twice: its thread frees the place
        self.cut_off_stalled += 1
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its thread's write returns at once; the thread ends
        except OSError:
            pass  # closed meanwhile

    # -- the answering threads ---------------------------------------------------------------
    def take_received(self, sock: socket.socket) -> tuple[bytes, float]:
        """(what the accepting thread read of this connection's request, when it was accepted)."""
        with self._lock:
            return self._received.pop(sock, (b"", time.monotonic()))

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._answered(request)

    def _answered(self, sock: socket.socket) -> None:
        with self._lock:
            self._answering.pop(sock, None)
            self._received.pop(sock, None)
        try:
            self._waker.send(b"\0")  # a complete request may be waiting for this place
        except OSError:
            pass

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client cut off, gone or refused: not news for the journal
        super().handle_error(request, client_address)

    # -- stopping ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the accepting thread's loop and wait for it (BaseServer's own waits for its own loop)."""
        self._stopping = True
        try:
            self._waker.send(b"\0")
        except OSError:
            pass
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake.close()
        self._waker.close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """GET /metrics on a loopback address (prometheus_client's WSGI app): one thread accepts and
    reads the requests, and each complete request is answered on a thread of its own, at most
    `max_connections` at once, each connection cut off `deadline_s` after its accept."""

    def __init__(self, metrics: Metrics, host: str, port: int, *, deadline_s: float = CONNECTION_DEADLINE_S,
                 max_connections: int = MAX_CONNECTIONS, max_waiting: int = MAX_WAITING):
        server_class = _Server6 if ":" in host else _Server
        try:
            self.server = server_class((host, port), deadline_s, max_connections, max_waiting)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {format_address(host, port)}: {exc.strerror or exc}") from None
        self.server.set_app(make_wsgi_app(metrics.registry))
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{format_address(self.host, self.port)}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the textfile -----------------------------------------------------------------------------

TEXTFILE_EVERY_S = 5.0


class TextfileWriter:
    """Writes the metrics for node_exporter's textfile collector: temp file, fsync, rename, so the
    collector never reads half a file. At most every TEXTFILE_EVERY_S seconds (and at exit); a failed
    write is counted by errno name and never raised (the daemon goes on guarding)."""

    def __init__(self, metrics: Metrics, path: Path, trust: Trust | None = None, every_s: float = TEXTFILE_EVERY_S):
        self.metrics = metrics
        self.path = Path(path)
        self.trust = trust
        self.every_s = every_s
        self.failures: dict[str, int] = {}
        self.last_failure = ""
        self._written_at: float | None = None

    def maybe_write(self, now: float) -> bool | None:
        """None when it is not time yet; else whether the write worked."""
        if self._written_at is not None and now - self._written_at < self.every_s:
            return None
        self._written_at = now
        return self.write()

    def write(self) -> bool:
        try:
            write_atomically(self.path, self.metrics.text(), self.trust)
            return True
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, "error") if exc.errno else "error"
            self.failures[name] = self.failures.get(name, 0) + 1
            self.last_failure = f"{self.path}: {exc.strerror or exc}"
            return False


def write_atomically(path: Path, data: bytes, trust: Trust | None = None) -> None:
    """Replace `path` through its checked directory (trustedfs): never through a symlink, nor in a
    directory someone else could swap. 0644: node_exporter runs as its own user."""
    with TrustedDirectory(path.parent, trust, shown=str(path)) as directory:
        directory.replace(path.name, data, 0o644)


def write_text(metrics: Metrics, destination: str) -> None:
    """`replay --metrics`: to a file the user names (or stdout)."""
    if destination == "-":
        sys.stdout.buffer.write(metrics.text())
        sys.stdout.flush()
        return
    with open_output(destination, "wb") as handle:  # never through a link planted at the name
        handle.write(metrics.text())
