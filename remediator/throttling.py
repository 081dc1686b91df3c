"""Time the protected service spent throttled by its own CPU quota (cgroup `cpu.max` on v2, CFS
`cpu.cfs_quota_us` on v1), read each tick from `cpu.stat` of the protected processes' cpu cgroups.

A throttled group's threads are runnable but may not run until the next period, so that time shows
up in their run-queue wait, and no neighbour is to blame for it: the tail is self-inflicted.

The counters are cumulative; a reader keeps the last value per cgroup and reports the difference.
A quota on a parent (the service's slice) throttles every cgroup below it, and the kernel counts it
on the parent only, so each protected cgroup is judged by the most throttled of itself and its
ancestors (not their sum: one throttled period stops the whole subtree once).

    cpu.stat, v2:  nr_periods N / nr_throttled N / throttled_usec N   (microseconds)
    cpu.stat, v1:  nr_periods N / nr_throttled N / throttled_time N   (nanoseconds)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .cgroupfs import CgroupFS, CgroupMount, discover_cpu_mount, process_cgroup_path
from .errors import RemediatorError
from .procfs import ProcFS
from .sample import Throttling


@dataclass(frozen=True)
class ThrottleCounters:
    periods: int
    throttled_periods: int
    throttled_ns: int

    def minus(self, earlier: "ThrottleCounters") -> "ThrottleCounters":
        # A counter that went back (the cgroup was removed and made again) starts over from 0.
        if self.periods < earlier.periods or self.throttled_ns < earlier.throttled_ns:
            return self
        return ThrottleCounters(self.periods - earlier.periods, self.throttled_periods - earlier.throttled_periods,
                                self.throttled_ns - earlier.throttled_ns)


def parse_cpu_stat(text: str) -> ThrottleCounters | None:
    """The throttling counters of a cpu.stat file (v1 or v2), or None when it has none (no quota support)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    if "nr_throttled" not in values:
        return None
    if "throttled_usec" in values:
        throttled_ns = values["throttled_usec"] * 1000
    else:
        throttled_ns = values.get("throttled_time", 0)
    return ThrottleCounters(values.get("nr_periods", 0), values["nr_throttled"], throttled_ns)


def _chain(cgroup_path: str) -> list[str]:
    """'/a/b' -> ['/a/b', '/a']: the cgroup and its ancestors below the root (the root has no quota)."""
    chain = []
    path = "/" + cgroup_path.strip("/")
    while path != "/":
        chain.append(path)
        path = path.rsplit("/", 1)[0] or "/"
    return chain


# A protected process's cpu cgroup is looked up again this often (as the collector re-checks what it
# knows of a process): a move to another cgroup is rare, and a /proc read every tick is not.
PATHS_KEPT_S = 5.0


class ThrottleReader:
    """Reads how long the protected processes' cpu cgroups were throttled since the last read."""

    def __init__(self, procfs: ProcFS, cgroupfs: CgroupFS, mount: CgroupMount,
                 clock: Callable[[], float] = time.monotonic):
        self.procfs = procfs
        self.cgroupfs = cgroupfs
        self.mount = mount
        self.clock = clock
        self._last: dict[str, ThrottleCounters] = {}
        self._paths: dict[int, tuple[float, str | None]] = {}  # pid -> (when read, its cpu cgroup)

    def _path_of(self, pid: int, now: float) -> str | None:
        """The cpu cgroup of `pid` as read within PATHS_KEPT_S; RemediatorError when it is gone."""
        kept = self._paths.get(pid)
        if kept is not None and now - kept[0] < PATHS_KEPT_S:
            return kept[1]
        path = process_cgroup_path(self.mount, self.procfs.cgroups(pid))
        self._paths[pid] = (now, path)
        return path

    @classmethod
    def discover(cls, procfs: ProcFS, cgroupfs: CgroupFS | None = None,
                 mountinfo_path: str | Path | None = None) -> "ThrottleReader | None":
        """A reader for this host's cpu hierarchy, or None when it has none."""
        cgroupfs = cgroupfs or CgroupFS()
        mount = discover_cpu_mount(cgroupfs=cgroupfs) if mountinfo_path is None else discover_cpu_mount(mountinfo_path, cgroupfs)
        return None if mount is None else cls(procfs, cgroupfs, mount)

    def _counters(self, cgroup_path: str) -> ThrottleCounters | None:
        directory = self.mount.fs_path(cgroup_path)
        if directory is None:
            return None
        try:
            return parse_cpu_stat(self.cgroupfs.read(directory / "cpu.stat"))
        except OSError:
            return None  # removed meanwhile, or a hierarchy without cpu.stat

    def read(self, pids: Iterable[int]) -> Throttling | None:
        """Throttling of the protected cgroups since the last read (0 on the first read of a
        cgroup); None when no protected process is in a cgroup that can be throttled."""
        paths = set()
        now = self.clock()
        asked = set(pids)
        for pid in [pid for pid in self._paths if pid not in asked]:
            del self._paths[pid]  # no longer protected: read afresh if it is again
        for pid in asked:
            try:
                path = self._path_of(pid, now)
            except RemediatorError:
                self._paths.pop(pid, None)
                continue  # gone: the next rescan drops it
            if path is not None and path.strip("/"):
                paths.add("/" + path.strip("/"))
        if not paths:
            self._last.clear()
            return None
        seen: dict[str, ThrottleCounters] = {}
        deltas: dict[str, ThrottleCounters] = {}
        for path in paths:
            for link in _chain(path):
                if link in seen:
                    continue
                counters = self._counters(link)
                if counters is None:
                    continue
                seen[link] = counters
                earlier = self._last.get(link)
                deltas[link] = counters.minus(earlier) if earlier is not None else ThrottleCounters(0, 0, 0)
        self._last = seen
        # Per protected cgroup, the most throttled link of its chain; across protected cgroups the
        # sum (separate groups are throttled separately).
        worst = []
        for path in sorted(paths):
            chain = [deltas[link] for link in _chain(path) if link in deltas]
            if chain:
                worst.append(max(chain, key=lambda c: (c.throttled_ns, c.throttled_periods)))
        return Throttling(
            cgroups=tuple(sorted(paths)),
            periods=sum(c.periods for c in worst),
            throttled_periods=sum(c.throttled_periods for c in worst),
            throttled_ns=sum(c.throttled_ns for c in worst),
        )
