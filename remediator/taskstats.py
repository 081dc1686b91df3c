"""Per-thread scheduler counters for the no-BPF fallback: taskstats over netlink (pyroute2), or schedstat.

Both give, per thread, (on-CPU ns, run-queue wait ns, timeslices): taskstats's cpu_run_virtual_total,
cpu_delay_total and cpu_count are the kernel's sum_exec_runtime, sched_info.run_delay and pcount,
the same numbers /proc/<pid>/task/<tid>/schedstat prints (tests/test_taskstats_live.py). What
taskstats adds is the exit notification: a thread that ends between two ticks sends its final
counters, so the wait it had since the previous tick is counted; polling schedstat finds its file
gone and loses that wait. Live threads are still read from schedstat: a taskstats request through
pyroute2 costs 170-400 us per thread against 12-16 us for the file (bench/fallback_cost.py, 64
threads: 10.9 ms against 0.8 ms a tick, 14x), for the same counters.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Protocol

from .errors import ProcessGone, RemediatorError
from .procfs import ProcFS

TASKSTATS = "taskstats"
SCHEDSTAT = "schedstat"

Counters = tuple[int, int, int]  # (on-CPU ns, run-queue wait ns, timeslices), cumulative


EXIT_BUFFER_BYTES = 4 * 1024 * 1024

class ThreadCounters(Protocol):
    name: str  # TASKSTATS or SCHEDSTAT: said in the source's limitations
    dropped: int  # exit records the kernel dropped (socket buffer full), cumulative

    def read(self, pid: int, tid: int) -> Counters:
        """One thread's counters; ProcessGone when it has exited."""
        ...

    def exited(self) -> dict[int, Counters]:
        """Threads that ended since the last call: tid -> final counters ({} where unknowable)."""
        ...

    def close(self) -> None: ...


class SchedstatCounters:
    """/proc/<pid>/task/<tid>/schedstat, one file per thread; no exit notifications."""

    name = SCHEDSTAT
    dropped = 0

    def __init__(self, procfs: ProcFS):
        self.procfs = procfs

    def read(self, pid: int, tid: int) -> Counters:
        return self.procfs.schedstat(pid, tid)

    def exited(self) -> dict[int, Counters]:
        return {}

    def close(self) -> None:
        pass


def _counters(stats) -> Counters:
    return stats["cpu_run_virtual_total"], stats["cpu_delay_total"], stats["cpu_count"]


class TaskstatsCounters:
    """The TASKSTATS generic netlink family: exit records pushed to a socket, drained each tick;
    live threads read from schedstat (cheaper, same counters), or by `request`.

    Needs CAP_NET_ADMIN for the exit registration (root here); raises RemediatorError when the
    family is missing (a kernel without CONFIG_TASKSTATS) or refused, and the caller uses schedstat.
    """

    name = TASKSTATS

    def __init__(self, procfs: ProcFS, cpus: int | None = None):
        self.procfs = procfs
        try:
            from pyroute2.netlink.exceptions import NetlinkError
            from pyroute2.netlink.taskstats import TaskStats
        except ImportError as exc:
            raise RemediatorError(f"taskstats: pyroute2 is not importable: {exc}") from None
        self._netlink_error = NetlinkError
        self.dropped = 0
        self._mask = f"0-{(cpus or os.cpu_count() or 1) - 1}"
        self._requests = self._exits = None
        try:
            self._requests = TaskStats()
            self._requests.bind()
            self._exits = TaskStats()
            self._exits.bind()
            # Exit records of every task on these CPUs come to this socket; read() drains it each tick.
            # A larger buffer (root may force it) drops fewer of them on a host with many exits.
            try:
                self._exits.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, EXIT_BUFFER_BYTES)
            except (OSError, AttributeError):
                pass
            self._exits.register_mask(self._mask)
        except (OSError, NetlinkError) as exc:
            self.close()
            raise RemediatorError(f"taskstats over netlink unavailable: {exc}") from None

    def read(self, pid: int, tid: int) -> Counters:
        # schedstat, not a netlink request: the same counters at 1/14 of the cost (module docstring).
        return self.procfs.schedstat(pid, tid)

    def request(self, pid: int, tid: int) -> Counters:
        """One thread's counters by a taskstats request (what the live tests compare with the probe)."""
        try:
            replies = self._requests.get_pid_stat(tid)
        except self._netlink_error as exc:
            if exc.code == errno.ESRCH:
                raise ProcessGone(tid, "thread exited") from None
            raise RemediatorError(f"taskstats for thread {tid} of pid {pid}: {exc}") from None
        for reply in replies:
            aggregate = reply.get_attr("TASKSTATS_TYPE_AGGR_PID")
            if aggregate is not None:
                return _counters(aggregate.get_attr("TASKSTATS_TYPE_STATS"))
        raise RemediatorError(f"taskstats for thread {tid} of pid {pid}: no per-task record in the reply")

    def exited(self) -> dict[int, Counters]:
        ended: dict[int, Counters] = {}
        while select.select([self._exits.fileno()], [], [], 0)[0]:
            try:
                messages = self._exits.get()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise RemediatorError(f"taskstats exit records: {exc}") from None
                # The kernel dropped records while we were away; the ones still queued are read on.
                self.dropped += 1
                continue
            for message in messages:
                for name, value in message.get("attrs", ()):
                    if name == "TASKSTATS_TYPE_AGGR_PID":
                        ended[value.get_attr("TASKSTATS_TYPE_PID")] = _counters(value.get_attr("TASKSTATS_TYPE_STATS"))
        return ended

    def close(self) -> None:
        if self._exits is not None:
            try:
                self._exits.deregister_mask(self._mask)
            except (OSError, self._netlink_error):
                pass
            self._exits.close()
            self._exits = None
        if self._requests is not None:
            self._requests.close()
            self._requests = None


def open_thread_counters(procfs: ProcFS) -> tuple[ThreadCounters, str | None]:
    """taskstats where the kernel offers it on the real /proc, else schedstat: (counters, why not taskstats)."""
    if procfs.root.resolve() != ProcFS().root.resolve():
        return SchedstatCounters(procfs), "a procfs tree other than /proc (netlink reads the live kernel)"
    try:
        return TaskstatsCounters(procfs), None
    except RemediatorError as exc:
        return SchedstatCounters(procfs), str(exc)
