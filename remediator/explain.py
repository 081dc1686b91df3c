"""`policy explain`: what the policies would touch on this host, now, and what the first step would do.

Read-only by construction: processes, and the current value each step's kind reads of them
(actuators/<kind>.py `effect`), come from procfs (the root is a parameter, so tests can use a fake
tree): the nice of a thread is field 19 of /proc/PID/task/TID/stat (what getpriority returns), its
affinity the Cpus_allowed_list of /proc/PID/task/TID/status (what sched_getaffinity returns), its
cgroup /proc/PID/cgroup.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

from .actuators import Host, kind_of
from .actuators.affinity import thread_affinity
from .baseline import Baselines, learning_needs
from .cgroupfs import CgroupFS, CgroupMount, discover_cpuset_mount, process_cpuset_cpus
from .cpulist import format_cpulist
from .errors import ProcessGone, RemediatorError
from .placement import auto_request_cpus, unprotected_cpus
from .model import Policy, PolicySet, Step
from .printable import printable
from .procfs import ProcessIdentity, ProcessInfo, ProcFS, boot_time, clock_ticks_per_second
from .safety import daemon_identity, exclusion_reason
from .schedgroups import SchedGroups, unreachable_reason
from .systemd import systemd_is_init
from .trees import descendants, format_tree, governing
from .selectors import ProtectSelectors


@dataclass
class ProcessEntry:
    """One live process a policy matches."""

    info: ProcessInfo
    fields: tuple[str, ...]
    detail: str
    status: str  # "acts" | "excluded" | "overridden"
    reason: str = ""  # why excluded, or which policy wins and why
    effect: str = ""  # what the first step would do (when status == "acts")
    effect_data: dict = field(default_factory=dict)
    cannot_work: list[tuple[int, Step, str]] = field(default_factory=list)  # (index, step, why): skipped here


@dataclass
class TreeEntry:
    """A tree policy's matched root and what becomes of each of its descendants."""

    root: ProcessInfo
    members: list[tuple[ProcessInfo, str]]  # (descendant, "covered" / "excluded: ..." / "governed by X")
    lines: list[str]  # the tree drawn, each descendant marked


@dataclass
class PolicyEntry:
    policy: Policy
    processes: list[ProcessEntry] = field(default_factory=list)
    threshold: str = ""  # a relative trigger's threshold now, from the daemon's learned baseline
    baseline_us: float | None = None
    trees: list[TreeEntry] = field(default_factory=list)


@dataclass(frozen=True)
class LearnedBaselines:
    """The baselines the daemon learned (from its saved engine state), for explain."""

    baselines: Baselines
    now: float  # engine time (CLOCK_MONOTONIC) to judge their age against
    source: str  # where they were read from, or why there are none


def _threshold_text(policy: Policy, learned: LearnedBaselines | None) -> tuple[str, float | None]:
    trigger = policy.trigger
    if not trigger.relative:
        return "", None
    percentile = trigger.tail_percentile or 99.0
    baselines = learned.baselines if learned else Baselines()
    now = learned.now if learned else 0.0
    baseline = baselines.value_us(percentile, now)
    text = trigger.describe_threshold(baseline, learning_needs())
    if baseline is not None:
        text += f"; p{percentile:g} baseline from {baselines.learned_from(percentile, now)} blocks of quiet"
    return f"{text} [{learned.source if learned else 'no daemon state read'}]", baseline


@dataclass
class ExplainReport:
    online_cpus: frozenset[int]
    request_cpus: frozenset[int]
    request_source: str  # "config" | "auto"
    protected: list[tuple[ProcessInfo, str]]
    policies: list[PolicyEntry]
    scanned: int
    unreadable: int
    notes: list[str]
    started: dict[int, str]  # pid -> readable start time

    @property
    def unprotected(self) -> frozenset[int]:
        return unprotected_cpus(self.request_cpus, self.online_cpus)

    def to_json(self) -> dict:
        def process(info: ProcessInfo) -> dict:
            return {"pid": info.pid, "comm": info.comm, "start_time": info.start_time, "started": self.started.get(info.pid, "")}

        return {
            "online_cpus": format_cpulist(self.online_cpus),
            "request_cpus": format_cpulist(self.request_cpus),
            "request_cpus_source": self.request_source,
            "unprotected_cpus": format_cpulist(self.unprotected),
            "protected": [{**process(info), "selector": reason, "sched_group": info.sched_group} for info, reason in self.protected],
            "policies": [
                {
                    "name": entry.policy.name,
                    "location": str(entry.policy.location),
                    "priority": entry.policy.priority,
                    "specificity": entry.policy.match.specificity,
                    "first_step": entry.policy.steps[0].describe(),
                    "threshold_now": entry.threshold or None,
                    "baseline_us": entry.baseline_us,
                    "processes": [
                        {
                            **process(item.info),
                            "fields": list(item.fields),
                            "detail": item.detail,
                            "status": item.status,
                            "reason": item.reason,
                            "first_step": item.effect_data if item.status == "acts" else None,
                            "sched_group": item.info.sched_group,
                            "steps_that_cannot_work": [
                                {"index": index, "step": step.describe(), "location": str(step.location), "reason": why}
                                for index, step, why in item.cannot_work
                            ],
                        }
                        for item in entry.processes
                    ],
                    **({"descendants": True, "trees": [
                        {"root": process(tree.root),
                         "members": [{**process(info), "status": status} for info, status in tree.members]}
                        for tree in entry.trees
                    ]} if entry.policy.match.descendants else {}),
                }
                for entry in self.policies
            ],
            "scanned": self.scanned,
            "unreadable": self.unreadable,
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        lines: list[str] = []
        lines.append(f"protected processes ({len(self.protected)}):")
        for info, reason in self.protected:
            group = f"  scheduling group {info.sched_group}" if info.sched_group else ""
            lines.append(f"  pid {info.pid} {info.comm}  started {self.started.get(info.pid, '?')}  by {reason}{group}")
        if not self.protected:
            lines.append("  none running")
        source = "from the config" if self.request_source == "config" else "auto: allowed CPUs of the protected processes' cgroups, or threads"
        lines.append(
            f"request CPUs: {format_cpulist(self.request_cpus) or 'none'} ({source}); online CPUs: "
            f"{format_cpulist(self.online_cpus)}; unprotected: {format_cpulist(self.unprotected) or 'none'}"
        )
        for entry in self.policies:
            policy = entry.policy
            lines.append("")
            lines.append(
                f"policy {policy.name} ({policy.location}), priority {policy.priority}, specificity {policy.match.specificity}"
            )
            lines.append(f"  trigger: {policy.trigger.describe()}")
            if entry.threshold:
                lines.append(f"  threshold now: {entry.threshold}")
            lines.append(f"  ladder: {' -> '.join(step.describe() for step in policy.steps)}")
            if not entry.processes:
                lines.append("  no live process matches")
            for item in entry.processes:
                info = item.info
                lines.append(f"  pid {info.pid} {info.comm}  started {self.started.get(info.pid, '?')}")
                lines.append(f"    matched by {', '.join(item.fields)}: {item.detail}")
                if item.status == "acts":
                    lines.append(f"    first step: {item.effect}")
                    for index, step, why in item.cannot_work:
                        lines.append(f"    cannot work on this host: step {index + 1} ({step.describe()}), skipped at once: {why}")
                elif item.status == "excluded":
                    lines.append(f"    excluded for safety: {item.reason}")
                else:
                    lines.append(f"    not acted on by this policy: {item.reason}")
            for tree in entry.trees:
                lines.append(f"  tree under pid {tree.root.pid} {tree.root.comm} (descendants = true: CPU and blame "
                             f"rolled up to it, steps on the members that run):")
                lines.extend("    " + line for line in tree.lines)
        matched = {item.info.pid for entry in self.policies for item in entry.processes}
        excluded = {item.info.pid for entry in self.policies for item in entry.processes if item.status == "excluded"}
        lines.append("")
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append(
            f"{len(self.policies)} policies; {len(matched)} processes matched, {len(excluded)} excluded for safety; "
            f"{self.scanned} processes scanned" + (f" ({self.unreadable} unreadable)" if self.unreadable else "")
        )
        # comm, cmdline, exe, cgroup and unit names are process-controlled: one line each, escaped.
        return "\n".join(printable(line) for line in lines) + "\n"


def first_step_effect(step: Step, policy: Policy, pid: int, host: Host) -> tuple[str, dict]:
    """What the step would change on this process now, in words and as data (its kind reads the
    current value, read only)."""
    data: dict[str, Any] = {"step": step.describe(), "kind": step.kind}
    try:
        text = kind_of(step.kind).effect(step.params, policy.name, policy.limits.min_cpus, pid, host, data)
    except ProcessGone:
        text = "process exited while being read"
    except RemediatorError as exc:
        text = f"cannot read the current value: {exc}"
    data["text"] = text
    return text, data


def _precedence_reason(winner: Policy, loser: Policy) -> str:
    if winner.priority != loser.priority:
        why = f"priority {winner.priority} > {loser.priority}"
    elif winner.match.specificity != loser.match.specificity:
        why = f"more specific: {winner.match.specificity} match fields > {loser.match.specificity}"
    else:
        why = f"same priority and specificity, earlier in file order ({winner.location} before {loser.location})"
    return f"policy {winner.name} wins ({why})"


def _start_times(procfs: ProcFS, infos: list[ProcessInfo]) -> dict[int, str]:
    try:
        booted = boot_time(procfs.root)
    except (OSError, ValueError):
        booted = 0.0
    ticks = clock_ticks_per_second()
    shown = {}
    for info in infos:
        if booted:
            moment = datetime.datetime.fromtimestamp(booted + info.start_time / ticks)
            shown[info.pid] = moment.strftime("%Y-%m-%d %H:%M:%S")
        else:
            shown[info.pid] = f"{info.start_time / ticks:.2f}s after boot"
    return shown


_DISCOVER = object()


def _add_trees(entries: list[PolicyEntry], processes: dict[int, ProcessInfo], policies: PolicySet, protected_pids,
               daemon: ProcessIdentity | None) -> None:
    """For each tree policy, the trees under the processes it matches and acts on."""
    for entry in entries:
        if not entry.policy.match.descendants:
            continue
        for item in entry.processes:
            governed = governing(item.info, processes, policies)
            if item.status != "acts" or governed is None or governed.root.identity != item.info.identity:
                continue  # excluded, overridden, or inside a higher root's tree (shown there)
            members = []
            for info in descendants(item.info, processes):
                owner = governing(info, processes, policies)
                excluded = exclusion_reason(info, protected_pids, processes=processes, daemon=daemon)
                if excluded:
                    status = f"excluded: {excluded}"
                elif owner is None or owner.policy.name != entry.policy.name:
                    status = f"governed by {owner.policy.name}" if owner else "not covered"
                else:
                    status = "covered"
                members.append((info, status))
            marks = {info.pid: f"[{status}]" for info, status in members}
            entry.trees.append(TreeEntry(item.info, members, format_tree(item.info, processes, marks)))
def _with_group(groups: SchedGroups, info: ProcessInfo) -> ProcessInfo:
    try:
        return dataclasses.replace(info, sched_group=groups.group_of(info.pid))
    except ProcessGone:
        return info


def explain(
    policies: PolicySet,
    protect: ProtectSelectors,
    procfs: ProcFS,
    online: frozenset[int],
    request_cpus: frozenset[int] | None = None,
    self_pid: int | None = None,
    cgroupfs: CgroupFS | None = None,
    cpuset_mount: CgroupMount | None | object = _DISCOVER,
    sched_groups: SchedGroups | None | object = _DISCOVER,
    learned: LearnedBaselines | None = None,
) -> ExplainReport:
    """Match every live process against the policies and the protect selectors; change nothing.

    `cgroupfs` and `cpuset_mount` (default: the host's) answer `auto` request CPUs from cgroups;
    `sched_groups` (default: the host's; None: not read) which nice and sched steps cannot work;
    `learned`: the daemon's learned baselines, for the thresholds of relative triggers;
    `self_pid`: remediator's pid in this tree (default: this process), off limits with what it forks."""
    daemon = daemon_identity(procfs, self_pid)
    cgroupfs = cgroupfs or CgroupFS()
    mount = discover_cpuset_mount(cgroupfs=cgroupfs) if cpuset_mount is _DISCOVER else cpuset_mount
    infos: list[ProcessInfo] = []
    unreadable = 0
    notes: list[str] = []
    for pid in sorted(procfs.pids()):
        try:
            infos.append(procfs.process_info(pid))
        except ProcessGone:
            continue
        except RemediatorError:
            unreadable += 1  # e.g. EACCES without root: cannot be judged
    protected: list[tuple[ProcessInfo, str]] = []
    needs_v1 = bool(protect.cgroups or protect.units)
    for info in infos:
        try:
            extra_paths = procfs.cgroups(info.pid).v1_paths.values() if needs_v1 else ()
        except RemediatorError:
            extra_paths = ()
        reason, refusal = protect.examine(info, extra_paths)
        if reason:
            protected.append((info, reason))
        elif refusal:
            notes.append(f"not protected: pid {info.pid} ({printable(info.comm)}) {refusal}")
    protected_pids = {info.pid for info, _ in protected}
    processes = {info.pid: info for info in infos}  # who forked whom: the service's workers are off limits too
    groups = SchedGroups.for_host(procfs, cgroupfs) if sched_groups is _DISCOVER else sched_groups
    if groups is not None:
        protected = [(_with_group(groups, info), reason) for info, reason in protected]
    protected_groups = [(info.pid, info.comm, info.sched_group) for info, _ in protected]

    if request_cpus is not None:
        request, source = frozenset(request_cpus), "config"
    else:
        source = "auto"
        threads: dict[int, list[int]] = {}
        for info, _ in protected:
            try:
                threads[info.pid] = procfs.tids(info.pid)
            except RemediatorError:
                continue
        by_tid = {tid: pid for pid, tids in threads.items() for tid in tids}

        def affinity_of(tid: int) -> frozenset[int]:
            try:
                return thread_affinity(procfs, by_tid[tid], tid)
            except ProcessGone:
                raise ProcessLookupError(tid) from None

        def cgroup_cpus(pid: int) -> frozenset[int] | None:
            try:
                return process_cpuset_cpus(cgroupfs, mount, procfs.cgroups(pid))  # type: ignore[arg-type]
            except RemediatorError:
                return None

        request = auto_request_cpus(threads, online, cgroup_cpus, get_affinity=affinity_of)
        if protect.empty:
            notes.append("nothing is protected (give --config or --protect-*): request CPUs are empty, so 'unprotected' is every online CPU")
        elif not protected:
            notes.append(f"no protected process is running ({protect.describe()}): auto request CPUs are empty")
    if not unprotected_cpus(request, online):
        notes.append(
            f"'unprotected' resolves to no CPU: the request path owns every online CPU ({format_cpulist(online)}); "
            "affinity and cpuset steps aimed at it would be skipped"
        )

    # On a systemd host, a cgroup step on v2 goes through systemd (actuators/cpuset.py, cpu.py).
    host = Host(procfs, systemd_is_init(), request, online)
    entries = [PolicyEntry(policy, [], *_threshold_text(policy, learned)) for policy in policies.policies]
    by_name = {entry.policy.name: entry for entry in entries}
    for info in infos:
        found = policies.matching(info)
        if not found:
            continue
        winner = found[0][0]
        excluded = exclusion_reason(info, protected_pids, processes=processes, daemon=daemon)
        for policy, result in found:
            item = ProcessEntry(info, result.fields, result.detail, "acts")
            if excluded:
                item.status, item.reason = "excluded", excluded
            elif policy is not winner:
                item.status, item.reason = "overridden", _precedence_reason(winner, policy)
            else:
                if groups is not None:
                    info = item.info = _with_group(groups, info)
                    for index, step in enumerate(policy.steps):
                        why = unreachable_reason(step.kind, (info.pid, info.comm, info.sched_group), protected_groups)
                        if why:
                            item.cannot_work.append((index, step, why))
                skipped = {index for index, _, _ in item.cannot_work}
                first = next((index for index in range(len(policy.steps)) if index not in skipped), None)
                if first is None:
                    item.effect = "none: no step of the ladder can work on this host"
                    item.effect_data = {"text": item.effect}
                else:
                    item.effect, item.effect_data = first_step_effect(policy.steps[first], policy, info.pid, host)
                    if first:
                        item.effect = f"step {first + 1} ({policy.steps[first].describe()}): {item.effect}"
                        item.effect_data["index"] = first
            by_name[policy.name].processes.append(item)
    _add_trees(entries, processes, policies, protected_pids, daemon)
    shown = [info for info, _ in protected] + [item.info for entry in entries for item in entry.processes]
    return ExplainReport(
        online_cpus=online,
        request_cpus=request,
        request_source=source,
        protected=protected,
        policies=entries,
        scanned=len(infos) + unreadable,
        unreadable=unreadable,
        notes=notes,
        started=_start_times(procfs, shown),
    )

