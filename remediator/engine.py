"""The engine: from windows, policies and the clock to decisions. Pure: no I/O, time is an argument.

    state, decisions = decide(state, sample, policies, settings)
    ... the daemon has the executor carry out each "act" / "revert" decision ...
    state = record_outcome(state, decision, outcome_status, now)

Rules, in the order they are checked:
- never act on a process no policy names, nor on one that safety rules exclude (PID 1, kernel
  threads, the protected service and what it forks, remediator itself and what it forks: by the
  parent chain the sample knows, by (pid, start time), see safety.py);
- a policy's ladder starts at step 0 when its trigger fires; the next step is considered only
  once the current one has had its settle time, and only while the trigger still holds;
- after the last step: no further escalation, and one warning;
- at most `max_actions_per_hour` actions per process and policy, and `max_changes_per_minute`
  across the host; placements by `always` policies count apart, per user, against the same number,
  so a user exec'ing processes a placement names cannot spend the budget remediations need;
- once the protected tail has stayed under the policy's threshold for `revert_after_quiet`, the
  process gets its originals back; after that, `cooldown` must pass before the policy acts on it
  again (so a process is not changed and given back in a loop);
- every action is verified: the rate of protected waits over the threshold (and the offender's
  blame share) over the settle period before it against the same period after it, with a verdict
  only when the change is beyond the windows' noise (verification.py). The verdict never holds
  the ladder back: whether the tail is still bad decides escalation. An inconclusive verdict is
  judged again over a longer after-period (up to MAX_REVERIFY more settle periods) while the ladder
  stays where it is; a later step or a revert ends the after-period, since it would confound it;
- a trigger relative to the service's own baseline ("5x baseline") is judged against the baseline
  learned so far (baseline.py) from quiet windows: no ladder in place, the tail under every
  trigger's threshold; the window of this tick is judged before it is learned from.
A nice or sched step that cannot reach any running protected process (offender and service in
different scheduling groups: cpu cgroups or autogroups, schedgroups.py) is skipped at once, with a
"skipped" decision, and the ladder goes on to its next step in the same tick.
An `always` policy places a process with its whole ladder as soon as it is seen (at exec), with no
tail condition, and never reverts it.

Engine time is CLOCK_MONOTONIC seconds from the samples (sample.end_ns), so a recording replays
with the same timing as the live run.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from typing import Collection, Iterable, Mapping, Sequence

from .actuators import kind_of
from .baseline import Baselines
from .detector import Window, blame_share, combined_tail_us, evaluate_trigger, own_throttling, self_inflicted, tail_over
from .model import ActionRequest, Policy, PolicySet, Step
from .procfs import ProcessIdentity, ProcessInfo
from .safety import exclusion_reason
from .sample import Sample
from .schedgroups import unreachable_reason
from .trees import governing
from .verification import INCONCLUSIVE, MAX_REVERIFY, PeriodCounts, judge, period_counts, threshold_boundary_ns

# How often a policy's "skipped: self-inflicted" is audited while the service keeps throttling itself.
SELF_INFLICTED_AUDIT_S = 60.0
# A per-minute cap is said (a "capped" decision) at most this often per user and policy.
CAPPED_SAID_EVERY_S = 60.0

APPLIED_STATUSES = frozenset({"applied", "would-apply", "unchanged"})
CHANGED_STATUSES = frozenset({"applied", "would-apply"})  # "unchanged": it was so already
GONE_STATUSES = frozenset({"gone"})


@dataclass(frozen=True)
class EngineSettings:
    request_cpus: frozenset[int]  # CPUs the request path owns (resolved by the daemon each tick)
    online_cpus: frozenset[int]
    max_changes_per_minute: int
    self_pid: int
    history_s: float = 120.0  # how much of the past the engine keeps, at least (see history_for)
    history_windows: int = 0  # and at least this many windows, whatever their length (a trigger's M)
    self_start_time: int | None = None  # with self_pid, remediator's identity; None: not among the processes (a replay)

    @property
    def daemon(self) -> ProcessIdentity | None:
        """Remediator's own (pid, start time): it and what it forks are off limits (safety.py)."""
        return None if self.self_start_time is None else ProcessIdentity(self.self_pid, self.self_start_time)


BASE_HISTORY_S = 120.0


def history_for(policies: PolicySet, tick_s: float) -> tuple[float, int]:
    """(seconds, windows) of the past the engine must keep for these policies: a verification
    compares the settle period before a step with the one after it, re-judged over up to
    MAX_REVERIFY more settle periods, so that plus a tick or two; a trigger looks at its last M
    (`of`) windows, whatever the tick. The schema bounds both (settle, of), so this is bounded too."""
    settle = max((step.settle_s for policy in policies.policies for step in policy.steps), default=0.0)
    of = max((policy.trigger.of_windows or 1 for policy in policies.policies), default=1)
    return max(BASE_HISTORY_S, (1 + MAX_REVERIFY) * settle + 2 * tick_s), of


@dataclass(frozen=True)
class Decision:
    kind: str  # "act" | "revert" | "verify" | "exhausted" | "capped" | "excluded" | "infeasible" | "skipped"
    at: float  # engine time (monotonic seconds)
    ts: float  # wall clock, for the audit
    info: ProcessInfo
    policy: Policy | None
    message: str
    step_index: int | None = None
    step: Step | None = None
    request: ActionRequest | None = None
    evidence: Mapping = field(default_factory=dict)
    action_id: str | None = None
    # An act under a tree policy: the tree's root (trees.governing), whose later evidence must come
    # after this step (EngineState.tree_steps).
    tree_root: ProcessIdentity | None = None

    @property
    def identity(self) -> ProcessIdentity:
        return self.info.identity


@dataclass(frozen=True)
class Remediation:
    """One policy's ladder on one process."""

    identity: ProcessIdentity
    policy: str
    step_index: int = -1  # the last step carried out; -1: none (or given back)
    last_action_at: float | None = None
    action_times: tuple[float, ...] = ()
    applied: bool = False  # something of it is in place (to give back)
    exhausted_warned: bool = False
    capped_warned_at: float | None = None
    reverted_at: float | None = None
    infeasible_warned: frozenset[int] = frozenset()
    skipped_warned: frozenset[int] = frozenset()  # steps said to be unable to work here (said once per ladder)


@dataclass(frozen=True)
class PendingVerification:
    action_id: str
    info: ProcessInfo
    policy: str
    step_index: int
    step_text: str
    at: float
    verify_at: float
    percentile: float
    threshold_us: float | None  # the over-threshold rate is counted above this (the trigger's, else the before tail)
    before_tail_us: float | None
    before_blame_share: float
    before_counts: PeriodCounts = PeriodCounts(())
    settle_s: float = 0.0
    reverified: int = 0  # times an inconclusive verdict was extended over another settle period


@dataclass(frozen=True)
class EngineState:
    windows: tuple[Window, ...] = ()
    remediations: Mapping[tuple[ProcessIdentity, str], Remediation] = field(default_factory=dict)
    pending: tuple[PendingVerification, ...] = ()
    recent_changes: tuple[float, ...] = ()  # engine times of actions, for the per-minute cap
    recent_placements: tuple[tuple[int, float], ...] = ()  # (uid, engine time) of `always` placements: their own cap
    last_over: Mapping[str, float] = field(default_factory=dict)  # policy -> last time its tail was over
    excluded_seen: frozenset[ProcessIdentity] = frozenset()
    next_action: int = 1
    self_inflicted_at: Mapping[str, float] = field(default_factory=dict)  # policy -> last "skipped" audit
    # (uid, policy) -> (when a per-minute cap was last said for them, how many times it held since
    # unsaid): not kept across restarts, at most one more line then.
    capped_said: Mapping[tuple[int, str], tuple[float, int]] = field(default_factory=dict)
    baselines: Baselines = field(default_factory=Baselines)  # the service's quiet tail, per percentile
    # (tree root, policy) -> when a step of that tree policy last changed a member of the tree. The
    # tick judges a tree by windows that began after it: its CPU and blame before then are the
    # harm that step answered (a burst child moved off at once by tail.within, its parent then
    # stepped for the child's CPU). Not kept across restarts: neither are the windows.
    tree_steps: Mapping[tuple[ProcessIdentity, str], float] = field(default_factory=dict)

    def active(self) -> list[Remediation]:
        return [r for r in self.remediations.values() if r.applied]

    def baseline_us(self, policy: Policy, now: float) -> float | None:
        """The learned baseline a relative trigger of `policy` is judged against (None: not learned, or absolute)."""
        trigger = policy.trigger
        if not trigger.relative:
            return None
        return self.baselines.value_us(trigger.tail_percentile or 99.0, now)

    def threshold_us(self, policy: Policy, now: float) -> float | None:
        return policy.trigger.threshold_us(self.baseline_us(policy, now))


def thresholds_now(state: EngineState, policies: PolicySet, now: float) -> list[tuple[float, float, tuple[str, ...]]]:
    """(percentile, threshold us, the policies' names) of each tail rule that has a threshold now
    (PolicySet.tail_rules): what state.threshold_us gives each of those policies."""
    found = []
    for trigger, names in policies.tail_rules:
        percentile = trigger.tail_percentile or 99.0
        threshold = trigger.threshold_us(state.baselines.value_us(percentile, now) if trigger.relative else None)
        if threshold is not None:
            found.append((percentile, threshold, names))
    return found


def _learn_baseline(state: EngineState, window: Window, policies: PolicySet,
                    thresholds: list[tuple[float, float, tuple[str, ...]]]) -> EngineState:
    """Learn from this window if it is quiet for the percentiles relative triggers watch: no ladder
    in place (a static `always` placement is the normal state, not a remediation) and nothing pending,
    and its tail not over any trigger's threshold on that percentile (baseline.py checks the waits).
    `thresholds`: thresholds_now() for this window's time."""
    relative = policies.relative_percentiles
    if not relative or state.pending:
        return state
    for remediation in state.remediations.values():
        policy = policies.by_name(remediation.policy)
        if remediation.applied and (policy is None or not policy.trigger.always):
            return state
    lowest: dict[float, float] = {}
    for percentile, threshold, _names in thresholds:
        if percentile in relative:
            lowest[percentile] = min(lowest.get(percentile, threshold), threshold)
    baselines = state.baselines.learn(lowest, window.counts, window.duration_s, window.end_s)
    return state if baselines is state.baselines else dataclasses.replace(state, baselines=baselines)


def _action_id(state: EngineState, info: ProcessInfo) -> tuple[str, EngineState]:
    return f"a{state.next_action}-{info.pid}", dataclasses.replace(state, next_action=state.next_action + 1)


def _request_for(step: Step, policy: Policy, info: ProcessInfo, settings: EngineSettings, index: int, evidence: dict) -> tuple[ActionRequest | None, str]:
    """The concrete request for a step, or None and why it cannot be done."""
    params, why_not = kind_of(step.kind).target(step.params, policy.name, policy.limits.min_cpus, settings.request_cpus,
                                                settings.online_cpus)
    if params is None:
        return None, why_not
    return ActionRequest(info.identity, step.kind, policy.name, index, params, evidence=evidence), ""


def _ladder_moved_at(pending: PendingVerification, state: EngineState) -> float | None:
    """When the process's ladder changed after the verified step (a later step, or a revert), if it did."""
    remediation = state.remediations.get((pending.info.identity, pending.policy))
    if remediation is None:
        return pending.at
    moves = [t for t in (remediation.last_action_at, remediation.reverted_at) if t is not None and t > pending.at + 1e-9]
    return min(moves) if moves else None


def _verify(pending: PendingVerification, state: EngineState, now: float, ts: float,
            policies: PolicySet) -> tuple[Decision | None, PendingVerification | None]:
    """The verdict on one step (a Decision), or the pending verification extended over another
    settle period (an inconclusive verdict while the ladder has not moved)."""
    moved_at = _ladder_moved_at(pending, state)
    end = pending.verify_at if moved_at is None else min(pending.verify_at, moved_at)
    after_windows = [w for w in state.windows if w.start_s >= pending.at - 1e-9 and w.end_s <= end + 1e-9]
    after_tail = combined_tail_us(after_windows, pending.percentile)
    after_share = blame_share(after_windows, pending.info.pid)
    before = pending.before_tail_us
    threshold = pending.threshold_us
    if threshold is None:
        result = {"verdict": INCONCLUSIVE}
        text = "no threshold to count waits over (the trigger has none and there were no waits before)"
    else:
        boundary = threshold_boundary_ns(threshold)
        verdict = judge(pending.before_counts, period_counts((w.counts for w in after_windows), boundary), boundary / 1000.0)
        if verdict.verdict == INCONCLUSIVE and pending.reverified < MAX_REVERIFY and moved_at is None:
            return None, dataclasses.replace(pending, verify_at=pending.verify_at + pending.settle_s,
                                             reverified=pending.reverified + 1)
        result = verdict.to_json()
        text = verdict.reason
    tails = f"p{pending.percentile:g} {_us(before)} -> {_us(after_tail)} us"
    label = {"helped": "helped", "did-not-help": "did not help"}.get(result["verdict"], "inconclusive")
    decision = Decision(
        kind="verify",
        at=now,
        ts=ts,
        info=pending.info,
        policy=policies.by_name(pending.policy),
        message=f"{pending.step_text}: {label}: {text}; {tails}",
        step_index=pending.step_index,
        action_id=pending.action_id,
        evidence={
            **result,
            "percentile": pending.percentile,
            "before_tail_us": None if before is None else round(before, 3),
            "after_tail_us": None if after_tail is None else round(after_tail, 3),
            "before_blame_share": round(pending.before_blame_share, 3),
            "after_blame_share": round(after_share, 3),
            "window_s": round(end - pending.at, 3),
            "reverified": pending.reverified,
            **({"after_cut_by": "a later step or a revert"} if moved_at is not None and moved_at < pending.verify_at else {}),
        },
    )
    return decision, None


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def tree_evidence(root: ProcessInfo, pid: int, own_cpu: float, windows: tuple[Window, ...]) -> dict:
    """What the audit shows of a tree policy's judgement: the root it rolled up to, the member acted on."""
    waited = sum(w.wait_ns for w in windows)
    return {
        "root": {"pid": root.pid, "start_time": root.start_time, "comm": root.comm},
        "members": max((len(w.members(root.identity, pid)) for w in windows), default=1),
        "member_cpu": round(own_cpu, 3),
        "member_blame_share": round(sum(w.blame.get(pid, 0) for w in windows) / waited, 3) if waited else 0.0,
    }


def _before_tree_step(state: EngineState, root: ProcessIdentity, policy: Policy, windows: Sequence[Window]) -> bool:
    """Whether the windows a tree policy's trigger judges began before that tree's last step."""
    stepped_at = state.tree_steps.get((root, policy.name))
    judged = windows[-(policy.trigger.of_windows or 1):]
    return stepped_at is not None and bool(judged) and judged[0].start_s < stepped_at


def _end_s(window: Window) -> float:
    return window.end_s


def decide(
    state: EngineState,
    sample: Sample,
    policies: PolicySet,
    settings: EngineSettings,
    discovered: Iterable[ProcessInfo] = (),
) -> tuple[EngineState, list[Decision]]:
    """Take one tick's sample; return the new state and what to do."""
    now = sample.end_ns / 1e9
    ts = sample.ts
    window = Window.from_sample(sample)
    # Windows are in time order: the recent ones are a tail, found by bisection (a tick keeps ~120).
    recent = len(state.windows) - bisect.bisect_left(state.windows, now - settings.history_s, key=_end_s)
    keep = max(recent, settings.history_windows - 1)
    windows = state.windows[max(0, len(state.windows) - keep):] + (window,)
    state = dataclasses.replace(state, windows=windows)
    decisions: list[Decision] = []

    # Which policies' tails are over their threshold now (for revert-after-quiet).
    thresholds = thresholds_now(state, policies, now)
    over = [name for percentile, threshold, names in thresholds
            if (value := window.tail_us(percentile)) is not None and value > threshold for name in names]
    if over:
        state = dataclasses.replace(state, last_over={**state.last_over, **dict.fromkeys(over, now)})

    # 1. Verifications whose settle period has ended.
    still_pending = []
    for pending in state.pending:  # (none on most ticks: the state is then not copied)
        if now >= pending.verify_at or (pending.reverified and _ladder_moved_at(pending, state) is not None):
            decision, extended = _verify(pending, state, now, ts, policies)
            if decision is not None:
                decisions.append(decision)
            if extended is not None:
                still_pending.append(extended)
        else:
            still_pending.append(pending)
    if state.pending:
        state = dataclasses.replace(state, pending=tuple(still_pending))

    # 2. Give back what has been quiet long enough.
    for remediation in list(state.remediations.values()):
        if not remediation.applied:
            continue
        policy = policies.by_name(remediation.policy)
        if policy is None or policy.trigger.always or policy.limits.revert_after_quiet_s is None:
            continue
        quiet_since = max(state.last_over.get(policy.name, float("-inf")), remediation.last_action_at or float("-inf"))
        if now - quiet_since >= policy.limits.revert_after_quiet_s:
            info = sample.processes.get(remediation.identity.pid)
            if info is None or info.identity != remediation.identity:
                info = ProcessInfo(pid=remediation.identity.pid, start_time=remediation.identity.start_time, comm="?")
            decisions.append(
                Decision(
                    kind="revert",
                    at=now,
                    ts=ts,
                    info=info,
                    policy=policy,
                    message=f"the protected tail has been under {state.threshold_us(policy, now):g} us for "
                    f"{policy.limits.revert_after_quiet_s:g} s: giving the originals back",
                    evidence={"quiet_s": round(now - quiet_since, 3)},
                )
            )

    # 3. Offenders: every process the sample names that a policy governs.
    candidates: dict[int, ProcessInfo] = {}
    for info in discovered:
        candidates[info.pid] = info
    for pid in list(window.usage) + list(window.blame):
        info = sample.processes.get(pid)
        if info is not None:
            candidates.setdefault(pid, info)
    offenders = _Offenders(state, now, ts, settings, sample.protected.pids, protected_groups_of(sample), sample.processes,
                           decisions)
    for pid, info in candidates.items():
        governed = sample.governing(info, policies)
        if governed is None:
            continue  # never act on what no policy names (itself, or through an ancestor's tree policy)
        policy, match = governed.policy, governed.match
        # A tree policy judges the tree under its matched ancestor and acts on the members that run.
        root = governed.root.identity if policy.match.descendants else None
        if offenders.excluded(info, policy, match):
            continue
        if policy.trigger.always:
            offenders.climb(info, policy, {"trigger": "always", "match": match.detail}, place=True)
            continue
        if root is not None and _before_tree_step(state, root, policy, windows):
            continue  # judged again on windows after the step this tree just had
        trigger_evidence = evaluate_trigger(policy.trigger, windows, pid, state.baseline_us(policy, now), root)
        if not trigger_evidence.fired:
            continue
        evidence = {"match": match.detail, **trigger_evidence.to_json()}
        # Over the trigger's whole M windows, not only those over the threshold: the kernel
        # counts a throttled period when it ends, which may be the next window.
        recent = tail_over(policy.trigger, windows)[0]
        throttling = own_throttling(recent)
        if throttling is not None:
            evidence["protected_throttling"] = throttling
        if self_inflicted(recent) is not None:
            # Never act on a neighbour when the service's own quota explains its tail.
            last = offenders.state.self_inflicted_at.get(policy.name)
            if last is None or now - last >= SELF_INFLICTED_AUDIT_S:
                offenders.state = dataclasses.replace(
                    offenders.state, self_inflicted_at={**offenders.state.self_inflicted_at, policy.name: now})
                decisions.append(Decision(
                    "skipped", now, ts, info, policy,
                    f"self-inflicted: the protected service was throttled by its own CPU quota for "
                    f"{throttling['throttled_ns'] / 1e6:.1f} ms ({throttling['throttled_periods']} periods), at least "
                    f"as long as others ran while it waited ({throttling['behind_others_ns'] / 1e6:.1f} ms): "
                    f"no step on a neighbour can help",
                    evidence={**evidence, "skipped": "self-inflicted"}))
            continue
        if root is not None:
            own_cpu = max((w.cpus(pid) for w in windows[-(policy.trigger.of_windows or 1):]), default=0.0)
            if own_cpu <= 0.0:
                continue  # the tree burns CPU but this member does not: act on those that run
            evidence["tree"] = tree_evidence(governed.root, pid, own_cpu, windows[-(policy.trigger.of_windows or 1):])
        offenders.climb(info, policy, evidence, tree_root=root)
    return _learn_baseline(offenders.finish(), window, policies, thresholds), decisions


@dataclass(frozen=True)
class BurstEvidence:
    """What the probe counted for one candidate (see sched_monitor.h, burst detection)."""

    waits: int  # protected waits over the threshold the candidate ran during
    first_s: float  # engine time the first of them ended
    last_s: float  # and the last
    last_wait_us: float  # the length of the last

    def to_json(self, trigger) -> dict:
        span_ms = (self.last_s - self.first_s) * 1000
        return {
            "trigger": "burst",
            "protected_tail": {
                "waits_over": self.waits,
                "threshold_us": trigger.tail_above_us,
                "within_ms": round((trigger.burst_within_s or 0) * 1000, 3),
                "span_ms": round(span_ms, 3),
                "last_wait_us": round(self.last_wait_us, 3),
            },
            "reason": f"{self.waits} protected waits above {trigger.tail_above_us:g} us within {span_ms:.1f} ms "
                      f"(need {trigger.burst_waits} within {(trigger.burst_within_s or 0) * 1000:g} ms), this process "
                      "running on the waiting thread's CPU during each",
        }


def decide_burst(
    state: EngineState,
    info: ProcessInfo,
    burst: BurstEvidence,
    policies: PolicySet,
    settings: EngineSettings,
    protected_pids: Collection[int],
    protected_groups: Sequence[tuple[int, str, str | None]],
    now: float,
    ts: float,
    ancestors: Mapping[int, ProcessInfo] | None = None,
) -> tuple[EngineState, list[Decision]]:
    """The probe says `info` was blamed for a burst of long protected waits: act at once, off the
    tick, if the policy that governs it asks for that (tail.within) and as many waits as it needs
    were counted. The same rules as a tick's (exclusions, ladder and settle, cooldown, caps), the
    same decisions, the same audit. `protected_groups`: protected_groups_of(the latest sample).
    `ancestors`: pid -> ProcessInfo of its known ancestors, so that a tree policy governs a child
    as at the tick (trees.governing): an xz under vector is the log shipper's; and so that a
    worker the protected service forked is off limits as at the tick (safety.py)."""
    decisions: list[Decision] = []
    known = {**(ancestors or {}), info.pid: info}
    governed = governing(info, known, policies)
    if governed is None:
        return state, decisions  # never act on what no policy names (itself, or through an ancestor's tree policy)
    policy, match = governed.policy, governed.match
    trigger = policy.trigger
    if trigger.always or trigger.burst_within_s is None:
        return state, decisions
    if burst.waits < max(2, trigger.burst_waits) or burst.last_s - burst.first_s > trigger.burst_within_s + 1e-9:
        return state, decisions  # not what this policy counts (a lone spike never acts)
    offenders = _Offenders(state, now, ts, settings, protected_pids, protected_groups, known, decisions)
    if not offenders.excluded(info, policy, match):
        # Its evidence is the burst just counted, never older than a step: no tree_steps check.
        offenders.climb(info, policy, {"match": match.detail, **burst.to_json(trigger)},
                        tree_root=governed.root.identity if policy.match.descendants else None)
    return offenders.finish(), decisions


def protected_groups_of(sample: Sample) -> list[tuple[int, str, str | None]]:
    """(pid, comm, scheduling group) of the protected processes the sample knows."""
    return [(pid, info.comm, info.sched_group) for pid in sample.protected.pids
            if (info := sample.processes.get(pid)) is not None]


class _Offenders:
    """One round of decisions on offenders: the ladder, cooldown and caps, shared by the tick and
    the burst path so that both follow the same rules."""

    def __init__(self, state: EngineState, now: float, ts: float, settings: EngineSettings,
                 protected_pids: Collection[int], protected_groups: Sequence[tuple[int, str, str | None]],
                 processes: Mapping[int, ProcessInfo], decisions: list[Decision]):
        self.state, self.now, self.ts, self.settings = state, now, ts, settings
        self.protected_pids = protected_pids
        self.processes = processes  # the offenders' known ancestors and the protected: who forked whom (safety.py)
        self.protected_groups = list(protected_groups)
        self.decisions = decisions
        self.recent_changes = tuple(t for t in state.recent_changes if t > now - 60.0)
        self.recent_placements = tuple((uid, t) for uid, t in state.recent_placements if t > now - 60.0)
        self.planned_placements: dict[int, int] = {}  # uid -> placements decided this round
        self.remediations = dict(state.remediations)
        self.excluded_seen = set(state.excluded_seen)
        self.planned_changes = 0
        # Kept while it counts unsaid holds (an hour at most), else its interval: (uid, policy) pairs.
        self.capped_said = {key: said for key, said in state.capped_said.items()
                            if now - said[0] < (3600.0 if said[1] else CAPPED_SAID_EVERY_S)}

    def excluded(self, info: ProcessInfo, policy: Policy, match) -> bool:
        reason = exclusion_reason(info, self.protected_pids, processes=self.processes, daemon=self.settings.daemon)
        if not reason:
            return False
        if info.identity not in self.excluded_seen:
            self.excluded_seen.add(info.identity)
            self.decisions.append(
                Decision("excluded", self.now, self.ts, info, policy, f"matched by {policy.name} ({match.detail}) but off limits: {reason}")
            )
        return True

    def climb(self, info: ProcessInfo, policy: Policy, evidence: dict, place: bool = False,
              tree_root: ProcessIdentity | None = None) -> None:
        """The trigger holds for `info` (or `place`: an always-policy places it): the next step, if
        the ladder, settle time, cooldown and caps allow. `tree_root`: the root of the tree a tree
        policy judged (see Decision.tree_root)."""
        now, ts, decisions, remediations = self.now, self.ts, self.decisions, self.remediations
        key = (info.identity, policy.name)
        remediation = remediations.get(key) or Remediation(info.identity, policy.name)
        if place:
            if remediation.step_index >= 0:
                return  # placed already
            steps = list(enumerate(policy.steps))
        else:
            if remediation.step_index < 0:
                if remediation.reverted_at is not None and now - remediation.reverted_at < policy.limits.cooldown_s:
                    return  # given back recently: leave it alone for the cooldown
                next_index = 0
            else:
                current = policy.steps[min(remediation.step_index, len(policy.steps) - 1)]
                if now - (remediation.last_action_at or now) < current.settle_s:
                    return  # the current step is still settling
                next_index = remediation.step_index + 1
            # Steps that cannot work between these scheduling groups are skipped now, not tried for a settle period.
            protected_groups = self.protected_groups
            while next_index < len(policy.steps):
                step = policy.steps[next_index]
                why = unreachable_reason(step.kind, (info.pid, info.comm, info.sched_group), protected_groups)
                if why is None:
                    break
                if next_index not in remediation.skipped_warned:
                    remediation = dataclasses.replace(remediation, skipped_warned=remediation.skipped_warned | {next_index})
                    remediations[key] = remediation
                    decisions.append(
                        Decision("skipped", now, ts, info, policy,
                                 f"step {next_index + 1} of {len(policy.steps)}: {step.describe()} cannot work on this host: {why}",
                                 step_index=next_index, step=step,
                                 evidence={**evidence, "sched_groups": {"offender": info.sched_group,
                                                                        "protected": {str(p): g for p, _, g in protected_groups}}})
                    )
                next_index += 1
            if next_index >= len(policy.steps):
                if not remediation.exhausted_warned:
                    remediation = dataclasses.replace(remediation, exhausted_warned=True)
                    remediations[key] = remediation
                    last = policy.steps[remediation.step_index].describe() if remediation.step_index >= 0 else None
                    decisions.append(
                        Decision("exhausted", now, ts, info, policy,
                                 f"the last step ({last}) is in place and the trigger still holds: no further escalation" if last
                                 else "no step of the ladder can work on this host (see the skipped steps): nothing to do",
                                 step_index=remediation.step_index if last else None, evidence=evidence)
                    )
                return
            steps = [(next_index, policy.steps[next_index])]

        # Caps: per process and policy per hour, and across the host per minute.
        hourly = tuple(t for t in remediation.action_times if t > now - 3600.0)
        if len(hourly) + len(steps) > policy.limits.max_actions_per_hour:
            if remediation.capped_warned_at is None or now - remediation.capped_warned_at >= 3600.0:
                remediations[key] = dataclasses.replace(remediation, capped_warned_at=now)
                decisions.append(
                    Decision("capped", now, ts, info, policy,
                             f"{len(hourly)} actions in the last hour: max_actions_per_hour = {policy.limits.max_actions_per_hour}",
                             evidence=evidence)
                )
            return
        if place:
            # A placement's budget is its user's: anyone can exec a process an always-policy names,
            # and those must never use up what the host's remediations need.
            placed = sum(1 for uid, _ in self.recent_placements if uid == info.uid) + self.planned_placements.get(info.uid, 0)
            if placed + len(steps) > self.settings.max_changes_per_minute:
                self._capped(info, policy, evidence,
                             f"{placed} placements of uid {info.uid}'s processes in the last minute: "
                             f"max_changes_per_minute = {self.settings.max_changes_per_minute} (per user, for always-policies)")
                return
        elif len(self.recent_changes) + self.planned_changes + len(steps) > self.settings.max_changes_per_minute:
            self._capped(info, policy, evidence,
                         f"{len(self.recent_changes) + self.planned_changes} changes in the last minute: "
                         f"max_changes_per_minute = {self.settings.max_changes_per_minute}")
            return

        for index, step in steps:
            request, why_not = _request_for(step, policy, info, self.settings, index, dict(evidence))
            if request is None:
                if index not in remediation.infeasible_warned:
                    remediation = dataclasses.replace(remediation, infeasible_warned=remediation.infeasible_warned | {index})
                    remediations[key] = remediation
                    decisions.append(Decision("infeasible", now, ts, info, policy, why_not, step_index=index, step=step, evidence=evidence))
                continue
            action_id, self.state = _action_id(self.state, info)
            if place:
                self.planned_placements[info.uid] = self.planned_placements.get(info.uid, 0) + 1
            else:
                self.planned_changes += 1
            decisions.append(
                Decision("act", now, ts, info, policy, f"step {index + 1} of {len(policy.steps)}: {step.describe()}",
                         step_index=index, step=step, request=request, evidence=evidence, action_id=action_id,
                         tree_root=tree_root)
            )

    def _capped(self, info: ProcessInfo, policy: Policy, evidence: dict, message: str) -> None:
        """A per-minute cap held: said at most once a minute per user and policy, the times it held
        in between counted into the next. Anyone can exec look-alikes of what an always-policy
        names by the hundred a second: a decision (an audit line, a log warning) for each would
        fill the disk and push the daemon's other messages past journald's rate limit."""
        key = (info.uid, policy.name)
        said = self.capped_said.get(key)
        if said is not None and self.now - said[0] < CAPPED_SAID_EVERY_S:
            self.capped_said[key] = (said[0], said[1] + 1)
            return
        if said is not None and said[1]:
            message += f" (held {said[1]} more time{'s' if said[1] != 1 else ''} for uid {info.uid} and this policy since it was last said)"
        self.capped_said[key] = (self.now, 0)
        self.decisions.append(Decision("capped", self.now, self.ts, info, policy, message, evidence=evidence))

    def finish(self) -> EngineState:
        return dataclasses.replace(self.state, remediations=self.remediations, excluded_seen=frozenset(self.excluded_seen),
                                   recent_changes=self.recent_changes, recent_placements=self.recent_placements,
                                   capped_said=self.capped_said)


def record_outcome(state: EngineState, decision: Decision, status: str, policies: PolicySet) -> EngineState:
    """Fold what the executor did with a decision back into the state."""
    now = decision.at
    remediations = dict(state.remediations)
    if decision.policy is None:
        return state
    key = (decision.identity, decision.policy.name)
    remediation = remediations.get(key) or Remediation(decision.identity, decision.policy.name)
    if status in GONE_STATUSES:
        return forget(state, decision.identity)

    if decision.kind == "revert":
        # left-changed-by-other: someone else's value stands; the change is over all the same.
        if status in ("restored", "would-apply", "dropped", "unchanged", "left-changed-by-other"):
            remediations[key] = Remediation(decision.identity, decision.policy.name, reverted_at=now,
                                            action_times=remediation.action_times)
        else:
            # Giving back failed (the audit says why): try again after another quiet period, not every tick.
            remediations[key] = dataclasses.replace(remediation, last_action_at=now)
        return dataclasses.replace(state, remediations=remediations)
    if decision.kind != "act" or decision.step is None or decision.step_index is None:
        return state

    # A step that failed (denied, invalid) still counts as tried: the ladder moves on after settling.
    remediation = dataclasses.replace(
        remediation,
        step_index=max(remediation.step_index, decision.step_index),
        last_action_at=now,
        action_times=tuple(t for t in remediation.action_times if t > now - 3600.0) + (now,),
        applied=remediation.applied or status in APPLIED_STATUSES,
        reverted_at=None,
    )
    remediations[key] = remediation
    if decision.tree_root is not None and status in CHANGED_STATUSES:
        # A step older than every window kept can no longer be after a judged window's start.
        oldest = state.windows[0].start_s if state.windows else now
        kept = {key: at for key, at in state.tree_steps.items() if at > oldest}
        state = dataclasses.replace(state, tree_steps={**kept, (decision.tree_root, decision.policy.name): now})
    if decision.policy.trigger.always:
        placed = state.recent_placements + ((decision.info.uid, now),)
        state = dataclasses.replace(state, remediations=remediations, recent_placements=placed)
    else:
        state = dataclasses.replace(state, remediations=remediations, recent_changes=state.recent_changes + (now,))
    if status in APPLIED_STATUSES and not decision.policy.trigger.always:
        trigger = decision.policy.trigger
        percentile = trigger.tail_percentile or 99.0
        settle = decision.step.settle_s
        before = [w for w in state.windows if w.start_s >= now - settle - 1e-9]  # the settle period before the step
        before_tail = combined_tail_us(before, percentile)
        threshold = state.threshold_us(decision.policy, now)  # a relative trigger's, from the learned baseline
        threshold = threshold if threshold is not None else before_tail
        counts = PeriodCounts(())
        if threshold is not None:
            counts = period_counts((w.counts for w in before), threshold_boundary_ns(threshold))
        pending = PendingVerification(
            action_id=decision.action_id or "",
            info=decision.info,
            policy=decision.policy.name,
            step_index=decision.step_index,
            step_text=decision.step.describe(),
            at=now,
            verify_at=now + settle,
            percentile=percentile,
            threshold_us=threshold,
            before_tail_us=before_tail,
            before_blame_share=blame_share(before, decision.info.pid),
            before_counts=counts,
            settle_s=settle,
        )
        state = dataclasses.replace(state, pending=state.pending + (pending,))
    return state


def forget(state: EngineState, identity: ProcessIdentity) -> EngineState:
    """The process is gone: drop everything about it."""
    return dataclasses.replace(
        state,
        remediations={key: value for key, value in state.remediations.items() if key[0] != identity},
        pending=tuple(p for p in state.pending if p.info.identity != identity),
        excluded_seen=frozenset(i for i in state.excluded_seen if i != identity),
    )


# -- across a restart ----------------------------------------------------------------------------
# What must outlive the process so that a crash loop (Restart=on-failure) cannot churn: each
# process's ladder position and cooldown, the per-policy hourly counts and the host's per-minute
# count, and the action-id counter (ids stay unique in the audit). Times are engine times,
# CLOCK_MONOTONIC seconds: that clock is the boot's, not the process's, so it is still valid after a
# restart within the same boot (the daemon discards state saved under another boot id). Windows and
# pending verifications are not kept: a verification needs the windows after its action, which a
# dead daemon did not see. The learned baselines are kept (as last exported, see baseline.py): a
# restart must not fall back to at_most for the minutes it takes to learn again.

STATE_FORMAT = 1


def export_state(state: EngineState) -> dict:
    """The part of the state that must survive a restart, as JSON-friendly data."""
    return {
        "format": STATE_FORMAT,
        "next_action": state.next_action,
        "recent_changes": list(state.recent_changes),
        "recent_placements": [list(item) for item in state.recent_placements],
        "baselines": state.baselines.to_json(),
        "remediations": [
            {
                "pid": r.identity.pid,
                "start_time": r.identity.start_time,
                "policy": r.policy,
                "step_index": r.step_index,
                "last_action_at": r.last_action_at,
                "action_times": list(r.action_times),
                "applied": r.applied,
                "exhausted_warned": r.exhausted_warned,
                "capped_warned_at": r.capped_warned_at,
                "reverted_at": r.reverted_at,
                "infeasible_warned": sorted(r.infeasible_warned),
            }
            for r in sorted(state.remediations.values(), key=lambda r: (r.identity, r.policy))
        ],
    }


def import_state(data: Mapping, state: EngineState | None = None) -> EngineState:
    """`state` (default: empty) with what export_state saved; ValueError when `data` is not that."""
    state = state or EngineState()

    def number(value, what: str, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what}: expected a number, got {value!r}")
        return float(value)

    try:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {STATE_FORMAT}")
        next_action = data["next_action"]
        if not isinstance(next_action, int) or isinstance(next_action, bool) or next_action < 1:
            raise ValueError(f"next_action: expected a positive integer, got {next_action!r}")
        recent = tuple(number(t, "recent_changes") for t in data["recent_changes"])
        placements = tuple((int(uid), number(t, "recent_placements")) for uid, t in data.get("recent_placements", []))
        saved_baselines = Baselines.from_json(data.get("baselines", {}))  # absent from files written before baselines
        remediations: dict[tuple[ProcessIdentity, str], Remediation] = {}
        for item in data["remediations"]:
            identity = ProcessIdentity(int(item["pid"]), int(item["start_time"]))
            policy = str(item["policy"])
            remediations[(identity, policy)] = Remediation(
                identity=identity,
                policy=policy,
                step_index=int(item["step_index"]),
                last_action_at=number(item["last_action_at"], "last_action_at", optional=True),
                action_times=tuple(number(t, "action_times") for t in item["action_times"]),
                applied=bool(item["applied"]),
                exhausted_warned=bool(item["exhausted_warned"]),
                capped_warned_at=number(item["capped_warned_at"], "capped_warned_at", optional=True),
                reverted_at=number(item["reverted_at"], "reverted_at", optional=True),
                infeasible_warned=frozenset(int(i) for i in item["infeasible_warned"]),
            )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"missing or malformed {exc}") from None
    # Baselines this process has learned already (a dry run turning live) are newer than the saved ones.
    baselines = state.baselines if state.baselines.by_percentile else saved_baselines
    # max: ids stay unique when a dry run (which counts on) turns live again
    return dataclasses.replace(state, remediations=remediations, recent_changes=recent, recent_placements=placements,
                               baselines=baselines, next_action=max(next_action, state.next_action))


def resume(
    state: EngineState,
    now: float,
    alive: Collection[ProcessIdentity],
    still_applied: Collection[ProcessIdentity],
    policies: Collection[str],
) -> EngineState:
    """Fit restored state to the host as the restarted daemon finds it.

    Processes gone (or pids reused) and policies no longer loaded are dropped. A remediation whose
    changes the journal no longer holds (on_start = "restore" gave them back) counts as given back
    now, so its cooldown starts now and its hourly count stays. One still in place keeps its ladder
    position, and its policy's quiet period starts again now: whether the tail was quiet while no
    daemon watched is unknown, so it is not given back on the first tick.
    """
    alive, still_applied, policies = set(alive), set(still_applied), set(policies)
    remediations = {}
    last_over = dict(state.last_over)
    for key, remediation in state.remediations.items():
        if remediation.identity not in alive or remediation.policy not in policies:
            continue
        if remediation.applied and remediation.identity not in still_applied:
            remediation = Remediation(remediation.identity, remediation.policy, reverted_at=now,
                                      action_times=remediation.action_times)
        elif remediation.applied:
            last_over[remediation.policy] = now
        remediations[key] = remediation
    recent = tuple(t for t in state.recent_changes if t > now - 60.0)
    placements = tuple((uid, t) for uid, t in state.recent_placements if t > now - 60.0)
    return dataclasses.replace(state, remediations=remediations, recent_changes=recent, recent_placements=placements,
                               last_over=last_over)


def given_back(state: EngineState, now: float) -> EngineState:
    """Every remediation given back at once (the daemon restored all its changes): cooldowns start
    now, hourly counts stay."""
    remediations = {
        key: Remediation(r.identity, r.policy, reverted_at=now, action_times=r.action_times) if r.applied else r
        for key, r in state.remediations.items()
    }
    return dataclasses.replace(state, remediations=remediations, pending=())


__all__ = [
    "Decision",
    "EngineSettings",
    "EngineState",
    "Remediation",
    "BurstEvidence",
    "decide",
    "decide_burst",
    "protected_groups_of",
    "export_state",
    "forget",
    "given_back",
    "history_for",
    "import_state",
    "resume",
    "record_outcome",
]
