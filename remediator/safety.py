"""Processes remediator must never change, whatever a policy says: PID 1, kernel threads, the
protected service and every process it forks, and remediator itself and every process it forks.

One function decides it, so `policy explain`, the engine, burst detection and the executor agree
on the reasons. Forks count at any depth. The protected pids user space holds learn of a fork of
the service late or never (the kernel protects a fork at once, the collector adds it at its next
rescan; a fork from before the probes loaded, or under the procfs source, it never adds), so the
service's workers are found by their parent chain, which every caller hands over with the process:
pid -> ProcessInfo of the ancestors it knows (a Sample's, /proc's).

Ancestry follows the chain by (pid, start time) (trees.chain), never by pid alone: a parent must
have started no later than its child, so a process whose parent's pid the service took after that
parent died is no fork of the service. A chain broken by a process the caller does not know proves
nothing, and the process is judged on what is left.
"""

from __future__ import annotations

import os
from typing import Callable, Collection, Mapping

from .errors import RemediatorError
from .procfs import ProcessIdentity, ProcessInfo, ProcFS
from .trees import chain


def daemon_identity(procfs: ProcFS, pid: int | None = None) -> ProcessIdentity | None:
    """Remediator's own (pid, start time) in this procfs tree (`pid`: this process by default);
    None when the tree does not hold it (a fake tree, a replay): then nothing there is remediator."""
    pid = os.getpid() if pid is None else pid
    if pid <= 0:
        return None
    try:
        return procfs.identity(pid)
    except RemediatorError:
        return None


def _forked_by(info: ProcessInfo, processes: Mapping[int, ProcessInfo],
               is_it: Callable[[ProcessInfo], bool]) -> tuple[ProcessInfo, int] | None:
    """The nearest known ancestor of `info` that `is_it`, and how many generations up (1: the parent)."""
    for generation, ancestor in enumerate(chain(info, processes), 1):
        if is_it(ancestor):
            return ancestor, generation
    return None


def service_ancestor(info: ProcessInfo, protected_pids: Collection[int],
                     processes: Mapping[int, ProcessInfo]) -> tuple[ProcessInfo, int] | None:
    """The nearest protected process `info` was forked under (at any depth) and the generations
    between them, or None. `processes` holds one process per pid and chain() links each parent by
    start time, so an ancestor at a protected pid is that protected process, not an older one."""
    return _forked_by(info, processes, lambda ancestor: ancestor.pid in protected_pids)


def services_own(info: ProcessInfo, protected_pids: Collection[int], processes: Mapping[int, ProcessInfo]) -> bool:
    """Whether `info` belongs to the protected service: protected itself, or forked under it."""
    return info.pid in protected_pids or service_ancestor(info, protected_pids, processes) is not None


def _kin(generation: int) -> str:
    return "a child" if generation == 1 else "a descendant"


def exclusion_reason(
    info: ProcessInfo,
    protected_pids: Collection[int],
    *,
    processes: Mapping[int, ProcessInfo],
    daemon: ProcessIdentity | None,
) -> str | None:
    """Why `info` is off limits, or None when a policy may act on it.

    `processes`: pid -> ProcessInfo holding at least the ancestors of `info` the caller knows;
    `daemon`: remediator's own identity (daemon_identity), None when it is not among them."""
    if info.pid == 1:
        return "PID 1 (init)"
    if info.kernel_thread:
        return "kernel thread"
    if daemon is not None and info.identity == daemon:
        return "remediator itself"
    if info.pid in protected_pids:
        return "protected service"
    if daemon is not None:
        found = _forked_by(info, processes, lambda ancestor: ancestor.identity == daemon)
        if found is not None:
            return f"{_kin(found[1])} of remediator"
    found = service_ancestor(info, protected_pids, processes)
    if found is not None:
        service, generation = found
        return f"{_kin(generation)} of the protected service ({service.comm}, pid {service.pid})"
    return None
