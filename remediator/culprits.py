"""Culprits on record that no engine decision names. When the process most to blame for the protected
service's wait is one no policy names, it is rightly left alone, but operators (and `policy suggest`)
must be able to see it. When the service's tail is bad and its own doing (it waited behind its own
threads, or was throttled by its own CPU quota) and no step was taken or skipped for it, nothing is
done either, and an operator reading the audit after the incident must find out why. This module
says which of these to put in the audit, at a bounded rate.

Pure: (sample, policies, state, now) -> (audit records, state). The daemon stamps and writes them.

    {"decision": "unnamed-culprit", "event": "unnamed-culprit", "process": {...}, "evidence": {...}}
    {"decision": "self-inflicted-tail", "event": "self-inflicted-tail", "process": {the service}, "evidence": {...}}

Only a process foreign to the service is a culprit: the kernel protects a fork of the service at
once, user space learns of it a tick or more later, so a worker the service just forked is its own
too (safety.services_own).

Bounded: one record per process identity (pid, start time) per `per_process_s`, and at most
`max_records` across the host per `window_s`; what the host-wide cap held back is counted in the
next record written (`evidence.held_back`). A self-inflicted tail: one record per service (its oldest
protected process, pid and start time) per `per_service_s`, and none while the engine's own
"skipped: self-inflicted" of the same tail is that recent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .engine import Decision
from .model import PolicySet
from .procfs import ProcessIdentity, ProcessInfo, shown_cmdline
from .safety import exclusion_reason, services_own
from .sample import Sample

EVENT = "unnamed-culprit"
SELF_INFLICTED_EVENT = "self-inflicted-tail"


@dataclass(frozen=True)
class CulpritSettings:
    min_blame_share: float = 0.2  # of the protected wait: less is not "the" culprit
    per_process_s: float = 600.0
    max_records: int = 6
    window_s: float = 600.0
    min_self_share: float = 0.2  # of the protected wait, behind its own threads or its own quota: less is not "its own doing"
    per_service_s: float = 600.0  # a self-inflicted tail: at most one record per service this often


@dataclass(frozen=True)
class CulpritState:
    last_recorded: Mapping[ProcessIdentity, float] = field(default_factory=dict)
    recent: tuple[float, ...] = ()  # engine times of the records written, for the host-wide cap
    held_back: int = 0  # culprits the host-wide cap kept out of the audit since the last record
    self_inflicted_at: Mapping[ProcessIdentity, float] = field(default_factory=dict)  # service -> its last record (or the engine's skip)


def harm(sample: Sample, policies: PolicySet) -> dict | None:
    """The protected tail by the first policy whose absolute threshold it is over (each at its own
    percentile); None when no policy would call it harm. With no tail policy at all, any wait counts."""
    tail_policies = [p for p in policies.policies if not p.trigger.always and p.trigger.tail_above_us]
    if not tail_policies:
        return {"percentile": None, "value_us": None, "threshold_us": None}
    for policy in tail_policies:
        percentile = policy.trigger.tail_percentile or 99.0
        value = sample.protected.percentile_ns(percentile)
        if value is not None and value / 1000.0 > policy.trigger.tail_above_us:
            return {"percentile": percentile, "value_us": round(value / 1000.0, 3), "threshold_us": policy.trigger.tail_above_us,
                    "policy": policy.name}
    return None


def _process(info: ProcessInfo) -> dict:
    return {
        "pid": info.pid,
        "start_time": info.start_time,
        "comm": info.comm,
        "exe": info.exe,
        "cmdline": shown_cmdline(info.cmdline),
        "cgroup": info.cgroup,
        "unit": info.unit,
        "user": info.user or info.uid,
        "ancestors": [comm for _, comm in info.ancestors],
    }


def unnamed_culprits(
    sample: Sample,
    policies: PolicySet,
    state: CulpritState,
    now: float,
    settings: CulpritSettings = CulpritSettings(),
    daemon: ProcessIdentity | None = None,
) -> tuple[list[dict], CulpritState]:
    """The audit record for this tick's top-blamed process when no policy names it (or none)."""
    waits = sample.protected
    if waits.wait_ns <= 0 or not sample.blame:
        return [], state
    tail = harm(sample, policies)
    if tail is None:
        return [], state  # the tail is fine by every policy's measure: blame alone is no harm
    # A pid the sample does not know cannot be judged own: it stays, and as the top one it is no record (below).
    foreign = [(pid, ns) for pid, ns in sample.blame
               if pid not in waits.pids
               and not (pid in sample.processes and services_own(sample.processes[pid], waits.pids, sample.processes))]
    if not foreign:
        return [], state
    pid, blamed_ns = max(foreign, key=lambda item: item[1])
    share = blamed_ns / waits.wait_ns
    if share < settings.min_blame_share:
        return [], state
    info = sample.processes.get(pid)
    if info is None or sample.governing(info, policies) is not None:
        return [], state  # unknown (gone), or named: the engine judges it
    last = state.last_recorded.get(info.identity)
    if last is not None and now - last < settings.per_process_s:
        return [], state
    recent = tuple(t for t in state.recent if t > now - settings.window_s)
    if len(recent) >= settings.max_records:
        return [], dataclasses.replace(state, recent=recent, held_back=state.held_back + 1)

    usage = sample.usage_of(pid)
    evidence = {
        "blame_share": round(share, 3),
        "blamed_ns": blamed_ns,
        "cpu": None if usage is None else round(sample.cpus_used(usage), 3),
        "protected_wait_ns": waits.wait_ns,
        "protected_tail": tail,
        "off_limits": exclusion_reason(info, waits.pids, processes=sample.processes, daemon=daemon),
        "held_back": state.held_back,
    }
    record = {  # the daemon stamps time and mode (audit.event_record)
        "decision": EVENT,
        "event": EVENT,
        "policy": None,
        "process": _process(info),
        "message": f"{info.comm} (pid {pid}) had {share:.0%} of the protected wait and no policy names it: left alone",
        "evidence": evidence,
    }
    known = {identity: at for identity, at in state.last_recorded.items() if now - at < settings.per_process_s}
    known[info.identity] = now
    return [record], dataclasses.replace(state, last_recorded=known, recent=recent + (now,), held_back=0)


def _judged_the_tail(decision: Decision) -> bool:
    """The engine put the tail on record: a trigger held and a step was taken, skipped, capped, ..."""
    return "protected_tail" in decision.evidence


def _skipped_as_self_inflicted(decision: Decision) -> bool:
    return decision.kind == "skipped" and decision.evidence.get("skipped") == "self-inflicted"


def self_inflicted_tail(
    sample: Sample,
    policies: PolicySet,
    state: CulpritState,
    now: float,
    settings: CulpritSettings = CulpritSettings(),
    decisions: Iterable[Decision] = (),
) -> tuple[list[dict], CulpritState]:
    """The audit record for a bad protected tail that is the service's own doing, when no step was
    taken or skipped for it: `decisions` are the engine's since the last tick.

    Its own doing: the wait behind its own threads plus the time its own CPU quota throttled it is at
    least `min_self_share` of its wait, and at least as long as all other processes ran on its CPUs
    while it waited (throttled time overlaps that: a neighbour may run while the service may not).
    Bad: over a policy's tail threshold (culprits.harm); with no tail policy nothing is "bad"."""
    decisions = list(decisions)
    waits = sample.protected
    tail = harm(sample, policies)
    if waits.wait_ns <= 0 or tail is None or tail["threshold_us"] is None:
        return [], state
    throttling = sample.throttling
    throttled_ns = 0 if throttling is None else throttling.throttled_ns
    own_doing_ns = waits.own_ns + throttled_ns
    if own_doing_ns < settings.min_self_share * waits.wait_ns or own_doing_ns < waits.blamed_ns:
        return [], state
    # The service, named by its oldest protected process; the collector always reads them, so none
    # known means they all went during the tick: no service to put on record.
    known = [sample.processes[pid] for pid in waits.pids if pid in sample.processes]
    if not known:
        return [], state
    service = min(known, key=lambda info: (info.start_time, info.pid))
    recent = {identity: at for identity, at in state.self_inflicted_at.items() if now - at < settings.per_service_s}
    if any(_skipped_as_self_inflicted(decision) for decision in decisions):
        # The engine said it itself (a trigger held, the step was skipped): that is the record.
        return [], dataclasses.replace(state, self_inflicted_at={**recent, service.identity: now})
    if any(_judged_the_tail(decision) for decision in decisions):
        return [], state  # a step was taken or refused for this tail: its record carries the tail
    if service.identity in recent:
        return [], state

    behind_others_ns = waits.blamed_ns
    evidence = {
        "protected_tail": tail,
        "protected_wait": {
            "wait_ns": waits.wait_ns,
            "behind_own_ns": waits.own_ns,
            "behind_others_ns": behind_others_ns,
            "unattributed_ns": waits.unattributed_ns,
        },
        "protected_throttling": None if throttling is None else throttling.to_json(),
        "protected_pids": list(waits.pids),
    }
    causes = [f"behind its own threads {waits.own_ns / 1e6:.1f} ms"]
    if throttling is None:
        causes.append("own CPU quota not measured")
    else:
        causes.insert(0, f"throttled by its own CPU quota {throttled_ns / 1e6:.1f} ms "
                         f"({throttling.throttled_periods} of {throttling.periods} periods)")
    record = {  # the daemon stamps time and mode (audit.event_record)
        "decision": SELF_INFLICTED_EVENT,
        "event": SELF_INFLICTED_EVENT,
        "policy": None,
        "process": _process(service),
        "message": f"the protected p{tail['percentile']:g} is {tail['value_us']:g} us, over {tail['threshold_us']:g} us "
                   f"(policy {tail['policy']}'s threshold), and self-inflicted: of its {waits.wait_ns / 1e6:.1f} ms wait, "
                   f"{', '.join(causes)}, behind all other processes {behind_others_ns / 1e6:.1f} ms. Nothing was done: "
                   f"no step was taken or skipped for it, and none on a neighbour could bring it down",
        "evidence": evidence,
    }
    return [record], dataclasses.replace(state, self_inflicted_at={**recent, service.identity: now})
