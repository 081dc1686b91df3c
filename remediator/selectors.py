"""Which processes are protected: selectors by pid, comm glob, cgroup path and systemd unit.

The same selectors serve `watch` flags and the daemon config's `[protect]` table. A process matches
when any selector matches it; every thread of a matched process is protected.

Any process can set its own comm, so a comm alone proves nothing. `users` names the uids a
protected process must run as (real and effective): a process the selectors match that runs as
anyone else is refused, not protected, and the caller is told why (`examine`, `resolve(refused=)`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import RemediatorError
from .procfs import ProcessInfo, ProcFS, system_units

KnownInfo = Callable[[int], "ProcessInfo | None"]  # pid -> who the caller already knows it to be, or None

# Prefixes that name a cgroup by its mount path rather than its path inside the hierarchy.
CGROUP_MOUNT_PREFIXES = (
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup/systemd",
    "/sys/fs/cgroup/cpuset",
    "/sys/fs/cgroup/cpu,cpuacct",
    "/sys/fs/cgroup/cpu",
    "/sys/fs/cgroup",
)


def normalize_cgroup_path(path: str) -> str:
    """'/sys/fs/cgroup/system.slice/x.service/' -> '/system.slice/x.service'."""
    path = "/" + path.strip().strip("/")
    for prefix in CGROUP_MOUNT_PREFIXES:
        if path == prefix:
            return "/"
        if path.startswith(prefix + "/"):
            return "/" + path[len(prefix) :].strip("/")
    return path


def _under(path: str, ancestor: str) -> bool:
    return ancestor == "/" or path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def normalize_unit(name: str) -> str:
    name = name.strip()
    return name if "." in name else name + ".service"


@dataclass(frozen=True)
class ProtectSelectors:
    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()  # fnmatch globs against the 15-character comm
    cgroups: tuple[str, ...] = ()  # hierarchy paths; a process in the cgroup or below it matches
    units: tuple[str, ...] = ()
    users: tuple[int, ...] = ()  # uids a protected process must run as; () = any user

    @classmethod
    def build(
        cls,
        pids: Iterable[int] = (),
        comms: Iterable[str] = (),
        cgroups: Iterable[str] = (),
        units: Iterable[str] = (),
        users: Iterable[int] = (),
    ) -> "ProtectSelectors":
        return cls(
            pids=tuple(int(p) for p in pids),
            comms=tuple(comms),
            cgroups=tuple(normalize_cgroup_path(c) for c in cgroups),
            units=tuple(normalize_unit(u) for u in units),
            users=tuple(dict.fromkeys(int(u) for u in users)),
        )

    @property
    def empty(self) -> bool:
        return not (self.pids or self.comms or self.cgroups or self.units)

    def describe(self) -> str:
        parts = [f"pid {p}" for p in self.pids]
        parts += [f"comm {c}" for c in self.comms]
        parts += [f"cgroup {c}" for c in self.cgroups]
        parts += [f"unit {u}" for u in self.units]
        shown = ", ".join(parts) or "nothing"
        if self.users and parts:
            shown += " as " + ("uid " if len(self.users) == 1 else "uids ") + ", ".join(map(str, self.users))
        return shown

    def user_refusal(self, info: ProcessInfo) -> str | None:
        """Why a process the selectors match may not be protected: it runs as a user `users` does not
        name (real or effective uid), or None when it may."""
        if not self.users:
            return None
        effective = info.euid if info.euid >= 0 else info.uid
        outside = [uid for uid in dict.fromkeys((info.uid, effective)) if uid not in self.users]
        if not outside:
            return None
        runs_as = f"uid {info.uid}" if effective == info.uid else f"uid {info.uid} (effective {effective})"
        return f"runs as {runs_as}, not as a protect user ({', '.join(map(str, self.users))})"

    def _comm_reason(self, comm: str) -> str | None:
        for pattern in self.comms:
            if fnmatch.fnmatchcase(comm, pattern):
                return f"comm {pattern}"
        return None

    def _cgroup_reason(self, paths: set[str], unit: str = "") -> str | None:
        for wanted in self.cgroups:
            if any(_under(path, wanted) for path in paths):
                return f"cgroup {wanted}"
        if self.units:
            # Anchored to the system manager's units (procfs.system_units): 'nginx.service' made by a
            # user's manager under user@1000.service, or nested in another unit, is not nginx's.
            units = {unit} - {""}
            for path in paths:
                units.update(system_units(path))
            for wanted_unit in self.units:
                if wanted_unit in units:
                    return f"unit {wanted_unit}"
        return None

    def selector_reason(self, info: ProcessInfo, cgroup_paths: Iterable[str] = ()) -> str | None:
        """Which selector matches this process ("comm nginx*"), or None; the users are not checked."""
        if info.kernel_thread:
            return None
        if info.pid in self.pids:
            return f"pid {info.pid}"
        return self._comm_reason(info.comm) or self._cgroup_reason({info.cgroup, *cgroup_paths} - {""}, info.unit)

    def examine(self, info: ProcessInfo, cgroup_paths: Iterable[str] = ()) -> tuple[str | None, str | None]:
        """(why protected, None), (None, why refused) when a selector matches but the user does not,
        or (None, None). `cgroup_paths` adds the v1 hierarchy paths of the process to `info`'s."""
        reason = self.selector_reason(info, cgroup_paths)
        if reason is None:
            return None, None
        refusal = self.user_refusal(info)
        if refusal is not None:
            return None, f"matches {reason} but {refusal}"
        return reason, None

    def match_reason(self, info: ProcessInfo, cgroup_paths: Iterable[str] = ()) -> str | None:
        """Why this process is protected ("comm nginx*"), or None (not matched, or refused)."""
        return self.examine(info, cgroup_paths)[0]

    def _first_look(self, procfs: ProcFS, pid: int, known: KnownInfo | None = None) -> bool:
        """A cheap look (comm from stat, then the cgroup file) before reading what the selectors
        judge by: whether the process may match. `known(pid)`: who the caller already knows the
        pid to be, as recently as it trusts (a process just read at its exec): its comm then costs
        no stat."""
        if pid in self.pids:
            return True
        if self.comms:
            info = known(pid) if known is not None else None
            if info is not None:
                comm, kernel_thread = info.comm, info.kernel_thread
            else:
                stat = procfs.stat(pid)
                comm, kernel_thread = stat.comm, stat.is_kernel_thread
            if not kernel_thread and self._comm_reason(comm):
                return True
        if self.cgroups or self.units:
            membership = procfs.cgroups(pid)
            return bool(self._cgroup_reason({membership.v2_path, *membership.v1_paths.values()} - {""}))
        return False

    def match_pid(
        self, procfs: ProcFS, pid: int, refused: dict[int, tuple[ProcessInfo, str]] | None = None,
        known: KnownInfo | None = None,
    ) -> tuple[ProcessInfo, str] | None:
        """(who the process is, why it is protected), or None: not matched, refused, gone or unreadable.
        A refused process goes into `refused` (pid -> (info, why)) when given. Who it is is what
        the selectors judge by (ProcFS.selector_reading: no exe, cmdline or ancestors)."""
        try:
            if not self._first_look(procfs, pid, known):
                return None
            # What the selectors and the users judge by, read together (one held process): not the
            # whole reading, which the caller makes when it wants one (Collector.info).
            info, membership = procfs.selector_reading(pid, cgroups=bool(self.cgroups or self.units),
                                                       users=bool(self.users))
            v1_paths = tuple(membership.v1_paths.values()) if membership is not None else ()
        except RemediatorError:
            return None  # gone, or unreadable (EACCES): cannot be judged, so not protected
        reason, refusal = self.examine(info, v1_paths)
        if refusal is not None and refused is not None:
            refused[pid] = (info, refusal)
        return (info, reason) if reason else None

    @property
    def lists_processes(self) -> bool:
        """Whether resolving looks at every process (comm, cgroup or unit selectors), not only at pids named."""
        return bool(self.comms or self.cgroups or self.units)

    def resolve(
        self, procfs: ProcFS, refused: dict[int, tuple[ProcessInfo, str]] | None = None,
        candidates: Iterable[int] | None = None, known: KnownInfo | None = None,
    ) -> dict[int, tuple[ProcessInfo, str]]:
        """Every live process the selectors match and the users allow: pid -> (info, reason).
        Those matched but refused go into `refused` when given. `candidates`: look only at these
        processes instead of listing /proc (the pids named are always the only ones looked at).
        `known`: see _first_look."""
        if not self.lists_processes:
            candidates = self.pids
        elif candidates is None:
            candidates = procfs.pids()
        matched = {}
        for pid in candidates:
            found = self.match_pid(procfs, pid, refused, known)
            if found:
                matched[pid] = found
        return matched
