"""Replaceable syscall objects for tests: record calls, inject errno values, run hooks, or fake threads.

`FaultySyscalls` passes calls through to the kernel (real processes) unless told to fail one;
`FakeThreads` keeps nice and masks in a dict, for fake procfs trees whose tids do not exist.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable

from remediator.actuators import Syscalls


@dataclass
class Fault:
    call: str
    errno_value: int
    skip: int  # let this many calls through first
    times: int | None  # then fail this many (None: every one)
    seen: int = 0

    def should_fail(self) -> bool:
        index = self.seen
        self.seen += 1
        if index < self.skip:
            return False
        return self.times is None or index < self.skip + self.times


class FaultySyscalls(Syscalls):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object]] = []
        self.faults: list[Fault] = []
        self.hooks: dict[str, tuple[Callable[[int], None], int]] = {}

    def inject(self, call: str, errno_value: int, *, skip: int = 0, times: int | None = None) -> None:
        """Make `call` fail with `errno_value` after `skip` successful calls, `times` times (None: always)."""
        self.faults.append(Fault(call, errno_value, skip, times))

    def before(self, call: str, hook: Callable[[int], None], *, skip: int = 0) -> None:
        """Run hook(tid) before the next `call` once `skip` of them have gone through (once)."""
        self.hooks[call] = (hook, skip)

    def _enter(self, call: str, tid: int, value: object = None) -> None:
        self.calls.append((call, tid, value))
        if call in self.hooks:
            hook, skip = self.hooks[call]
            if skip:
                self.hooks[call] = (hook, skip - 1)
            else:
                del self.hooks[call]
                hook(tid)
        for fault in self.faults:
            if fault.call == call and fault.should_fail():
                raise OSError(fault.errno_value, os.strerror(fault.errno_value))

    def changes(self) -> list[tuple[str, int, object]]:
        return [call for call in self.calls if call[0].startswith(("setpriority", "sched_setaffinity", "sched_setscheduler"))]

    def getpriority(self, tid: int) -> int:
        self._enter("getpriority", tid)
        return super().getpriority(tid)

    def setpriority(self, tid: int, value: int) -> None:
        self._enter("setpriority", tid, value)
        super().setpriority(tid, value)

    def sched_getaffinity(self, tid: int) -> frozenset[int]:
        self._enter("sched_getaffinity", tid)
        return super().sched_getaffinity(tid)

    def sched_setaffinity(self, tid, cpus) -> None:
        self._enter("sched_setaffinity", tid, frozenset(cpus))
        super().sched_setaffinity(tid, cpus)

    def sched_getscheduler(self, tid: int) -> int:
        self._enter("sched_getscheduler", tid)
        return super().sched_getscheduler(tid)

    def sched_setscheduler(self, tid: int, policy: int, priority: int) -> None:
        self._enter("sched_setscheduler", tid, (policy, priority))
        super().sched_setscheduler(tid, policy, priority)


class FakeThreads(Syscalls):
    """Thread state for tids that exist only in a fake procfs tree."""

    def __init__(self, cpus: frozenset[int] = frozenset({0, 1, 2, 3})) -> None:
        self.nice: dict[int, int] = {}
        self.masks: dict[int, frozenset[int]] = {}
        self.all_cpus = cpus
        self.calls: list[tuple[str, int, object]] = []

    def add(self, tid: int, nice: int = 0, mask: frozenset[int] | None = None) -> None:
        self.nice[tid] = nice
        self.masks[tid] = mask if mask is not None else self.all_cpus

    def _known(self, tid: int) -> None:
        if tid not in self.nice:
            raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))

    def getpriority(self, tid: int) -> int:
        self._known(tid)
        return self.nice[tid]

    def setpriority(self, tid: int, value: int) -> None:
        self.calls.append(("setpriority", tid, value))
        self._known(tid)
        self.nice[tid] = value

    def sched_getaffinity(self, tid: int) -> frozenset[int]:
        self._known(tid)
        return self.masks[tid]

    def sched_setaffinity(self, tid, cpus) -> None:
        self.calls.append(("sched_setaffinity", tid, frozenset(cpus)))
        self._known(tid)
        self.masks[tid] = frozenset(cpus)
