"""A scripted Source and a settable clock for collector tests (no kernel, no probes)."""

from __future__ import annotations

from remediator.probes import ExecEvent
from remediator.sources import TickDelta


class RecordingSource:
    """A Source that records what the collector tells it and returns scripted deltas."""

    name = "bpf"
    window_ns = 100_000_000
    limitations = ()
    has_exec_events = True
    has_task_events = False
    report_floor_ns = 0

    def __init__(self):
        self.kernel_tids: set[int] = set()
        self.pending_execs: list[ExecEvent] = []
        self.next_delta = TickDelta(0, 1_000_000_000)
        self.forgotten: set[int] = set()
        self.pending_changes: set[int] = set()  # processes renamed (with has_task_events)
        self.pending_moves: set[int] = set()  # threads moved to another cgroup (with has_task_events)
        self.kernel_changes: int | None = None  # protected_changes(): None, as procfs

    def protect(self, tids):
        self.kernel_tids |= set(tids)

    def unprotect(self, tids):
        self.kernel_tids -= set(tids)

    def kernel_protected_tids(self, only_if_forked=False):
        return set(self.kernel_tids)

    def exec_events(self):
        events, self.pending_execs = self.pending_execs, []
        return events

    def protected_changes(self):
        return self.kernel_changes

    def task_changes(self):
        renamed, self.pending_changes = self.pending_changes, set()
        moved, self.pending_moves = self.pending_moves, set()
        return renamed, moved

    def read(self, protected):
        return self.next_delta

    def forget(self, tgids):
        self.forgotten |= set(tgids)

    def close(self):
        pass


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now
