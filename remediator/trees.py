"""Process trees from ProcessInfo: parent chains, descendant sets, and which policy governs a
process through an ancestor (`match.descendants = true`).

Pure: the processes are a pid -> ProcessInfo mapping (a Sample's, or /proc read by `explain`).
A parent is the process with the child's ppid that started no later than the child: a process
that started after the child cannot be its parent, it only took a dead parent's pid. So identity
along a chain is (pid, start time), never a pid alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .matching import MatchResult
from .model import Policy, PolicySet
from .procfs import ProcessIdentity, ProcessInfo

MAX_DEPTH = 64  # deeper than any real tree; stops a cycle in inconsistent data


def parent_of(info: ProcessInfo, processes: Mapping[int, ProcessInfo]) -> ProcessInfo | None:
    """The parent's ProcessInfo, or None when unknown, PID 1, or a process that reused the parent's pid."""
    if info.ppid <= 1 or info.ppid == info.pid:
        return None
    parent = processes.get(info.ppid)
    if parent is None or parent.start_time > info.start_time:
        return None
    return parent


def chain(info: ProcessInfo, processes: Mapping[int, ProcessInfo]) -> list[ProcessInfo]:
    """Known ancestors, parent first, PID 1 excluded; stops at the first one not known."""
    found: list[ProcessInfo] = []
    seen = {(info.pid, info.start_time)}  # identities as plain tuples: the engine walks chains every tick
    current = parent_of(info, processes)
    while current is not None and (current.pid, current.start_time) not in seen and len(found) < MAX_DEPTH:
        found.append(current)
        seen.add((current.pid, current.start_time))
        current = parent_of(current, processes)
    return found


def ancestors_read(info: ProcessInfo, read: Callable[[int], ProcessInfo | None]) -> dict[int, ProcessInfo]:
    """pid -> ProcessInfo of `info`'s ancestors as `read(pid)` gives them (a cache's reading, a
    sketch), parent first, up to the first one it cannot give (gone): what governing() needs of
    a process's chain where no sample holds it."""
    found: dict[int, ProcessInfo] = {}
    for pid, _comm in info.ancestors:
        ancestor = read(pid)
        if ancestor is None:
            break
        found[pid] = ancestor
    return found


def lineage(info: ProcessInfo, processes: Mapping[int, ProcessInfo]) -> tuple[ProcessIdentity, ...]:
    """The process's identity, then its known ancestors': what a tree membership test needs."""
    return (info.identity,) + tuple(ancestor.identity for ancestor in chain(info, processes))


def descendants(root: ProcessInfo, processes: Mapping[int, ProcessInfo]) -> list[ProcessInfo]:
    """Every known process below `root` (children, grandchildren, ...), by pid."""
    return sorted(
        (info for info in processes.values() if info.identity != root.identity and root.identity in lineage(info, processes)),
        key=lambda info: info.pid,
    )


@dataclass(frozen=True)
class Governed:
    """The policy that governs a process, how it matched, and the tree root the trigger judges."""

    policy: Policy
    match: MatchResult
    root: ProcessInfo  # the process itself, or the matched ancestor whose policy covers descendants


def governing(info: ProcessInfo, processes: Mapping[int, ProcessInfo], policies: PolicySet) -> Governed | None:
    """Which policy governs `info`: its own match wins; else the nearest matched ancestor's policy
    when that policy covers descendants. With a tree policy the root is the highest ancestor that
    policy matches along an unbroken chain (a vector forked by vector rolls up to the first)."""
    selected = policies.select(info)
    policy, how, root = (selected[0], selected[1], info) if selected else (None, None, None)
    if (policy is not None and not policy.match.descendants) or (policy is None and not policies.covers_descendants):
        # Nothing above can change the answer: an ancestor is looked at only for a tree policy,
        # its own or (when none matched) the nearest one above. Not walking the chain matters on
        # a host that execs: every new process is asked, and shells nest deep.
        return Governed(policy, how, root) if policy is not None and how is not None else None
    for ancestor in chain(info, processes):
        above = policies.select(ancestor)
        if above is None:
            continue
        if not above[0].match.descendants or (policy is not None and above[0].name != policy.name):
            break  # the nearest governed ancestor does not cover this process
        root = ancestor
        if selected is None:
            policy = above[0]
            how = MatchResult(above[1].fields, f"descendant of {root.comm} (pid {root.pid}): {above[1].detail}")
    if policy is None or how is None or root is None:
        return None
    return Governed(policy, how, root)


def format_tree(root: ProcessInfo, processes: Mapping[int, ProcessInfo], marks: Mapping[int, str] | None = None) -> list[str]:
    """The tree under `root` as indented lines ('vector (pid 10)', '  xz (pid 11) ...')."""
    marks = marks or {}
    children: dict[ProcessIdentity, list[ProcessInfo]] = {}
    for info in descendants(root, processes):
        parent = parent_of(info, processes)
        if parent is not None:
            children.setdefault(parent.identity, []).append(info)
    lines: list[str] = []

    def walk(node: ProcessInfo, depth: int) -> None:
        mark = marks.get(node.pid, "")
        lines.append("  " * depth + f"{node.comm} (pid {node.pid})" + (f" {mark}" if mark else ""))
        if depth < MAX_DEPTH:
            for child in children.get(node.identity, []):
                walk(child, depth + 1)

    walk(root, 0)
    return lines


def tree_pids(lineages: Mapping[int, tuple[ProcessIdentity, ...]], root: ProcessIdentity) -> list[int]:
    """The pids whose lineage passes through `root` (the root itself included)."""
    return [pid for pid, line in lineages.items() if root in line]


def lineages_of(pids: Iterable[int], processes: Mapping[int, ProcessInfo]) -> dict[int, tuple[ProcessIdentity, ...]]:
    return {pid: lineage(processes[pid], processes) for pid in pids if pid in processes}
