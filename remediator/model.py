"""Plain data shared across the pipeline's layers: policies as compiled, what a step asks for and
what came of it.

Behaviour lives above these types. policy.py compiles TOML into Policy objects; the pure engine
reads them and builds ActionRequests without importing the executor or the TOML stack, and the
actuators resolve CpuSpecs without importing it either (policy -> config, schema, tomlpos).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from .cpulist import format_cpulist
from .durations import format_duration
from .errors import Location
from .matching import Match, MatchResult
from .procfs import ProcessIdentity, ProcessInfo

if TYPE_CHECKING:
    from .schema import Diagnostic


@dataclass(frozen=True)
class CpuSpec:
    """Target CPUs of an affinity or cpuset step."""

    unprotected: bool  # resolve at run time: online CPUs minus request CPUs
    cpus: frozenset[int] = frozenset()  # explicit set when not unprotected (empty otherwise)

    def describe(self) -> str:
        return "unprotected" if self.unprotected else format_cpulist(self.cpus)


@dataclass(frozen=True)
class Step:
    kind: str  # an action kind (actuators/<kind>.py): "nice", "sched", "affinity", "cpu", "cpuset"
    settle_s: float
    location: Location  # where this step's table is
    # The kind's parameters as it compiled them: {"nice": 10}, {"sched": "idle"}, {"cpus": CpuSpec},
    # {"cpus": CpuSpec, "cgroup": "log-shippers"}, {"cpu": {"weight": 10}}.
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))  # frozen, as the rest

    def describe(self) -> str:
        """'nice 10', 'sched idle', 'affinity unprotected', 'cpuset 2-3 in cgroup log-shippers'."""
        from .actuators import kind_of  # here, not at the top: the kinds import this module

        return kind_of(self.kind).describe(self.params)

    def same_action(self, other: "Step") -> bool:
        """Equal apart from where it is written."""
        return (self.kind, self.settle_s, dict(self.params)) == (other.kind, other.settle_s, dict(other.params))

    def to_json(self) -> dict:
        data: dict[str, Any] = {"kind": self.kind, "settle_s": self.settle_s, "location": str(self.location)}
        for name, value in self.params.items():
            data[name] = value.describe() if isinstance(value, CpuSpec) else dict(value) if isinstance(value, Mapping) else value
        return data


@dataclass(frozen=True)
class Trigger:
    always: bool
    tail_percentile: float | None  # e.g. 99.0
    tail_above_us: float | None
    windows: int | None  # N
    of_windows: int | None  # M
    offender_cpu: float | None  # CPUs
    offender_cpu_kind: str  # "mean" | "peak"
    offender_blame_share: float | None  # 0..1
    offender_require: str  # "any" | "all"
    # A threshold relative to the protected service's learned quiet baseline ("5x baseline"):
    # tail_above_us is then at_most, the threshold until the baseline is learned (see threshold_us).
    tail_baseline_factor: float | None = None
    tail_at_least_us: float | None = None
    tail_at_most_us: float | None = None

    @property
    def relative(self) -> bool:
        return self.tail_baseline_factor is not None

    def threshold_us(self, baseline_us: float | None) -> float | None:
        """The tail threshold now: the absolute one, or the factor times the baseline bounded by
        at_least and at_most (at_most while no baseline is learned)."""
        if self.tail_baseline_factor is None or baseline_us is None:
            return self.tail_above_us
        assert self.tail_at_least_us is not None and self.tail_at_most_us is not None
        return min(max(self.tail_baseline_factor * baseline_us, self.tail_at_least_us), self.tail_at_most_us)

    def describe_threshold(self, baseline_us: float | None, needs: str = "") -> str:
        """'2ms', or how a relative threshold comes out of the baseline: '1ms (5x baseline 70us =
        350us, raised to at_least)', '2ms (at_most: no baseline learned yet; it takes ...)'."""
        threshold = self.threshold_us(baseline_us)
        shown = format_duration(round(threshold or 0.0, 1) / 1e6)
        if not self.relative:
            return shown
        if baseline_us is None:
            return f"{shown} (at_most: no baseline learned yet{'; it takes ' + needs if needs else ''})"
        raw = (self.tail_baseline_factor or 0.0) * baseline_us
        bound = ""
        if threshold != raw:
            bound = ", raised to at_least" if threshold == self.tail_at_least_us else ", capped at at_most"
        return f"{shown} ({self.tail_baseline_factor:g}x baseline {baseline_us:.0f}us = {raw:.0f}us{bound})"
    burst_within_s: float | None = None  # tail.within: also fire off the tick, on the probe's event
    burst_waits: int = 2  # tail.waits: blamed waits over tail.above within burst_within_s

    def describe(self) -> str:
        if self.always:
            return "always (static placement at exec)"
        conditions = []
        if self.offender_cpu is not None:
            conditions.append(f"{self.offender_cpu_kind} CPU >= {self.offender_cpu:g}")
        if self.offender_blame_share is not None:
            conditions.append(f"blame share >= {self.offender_blame_share:g}")
        joiner = " and " if self.offender_require == "all" else " or "
        if self.relative:
            above = (f"{self.tail_baseline_factor:g}x its quiet baseline (at least {format_duration((self.tail_at_least_us or 0) / 1e6)}, "
                     f"at most {format_duration((self.tail_at_most_us or 0) / 1e6)}, which holds until the baseline is learned)")
        else:
            above = format_duration((self.tail_above_us or 0) / 1e6)
        # tail_above_us is at_most for a relative threshold: a counted wait must be over it
        burst = (f"; or at once, {self.burst_waits} waits above {format_duration((self.tail_above_us or 0) / 1e6)} blamed on "
                 f"the offender within {format_duration(self.burst_within_s)}" if self.burst_within_s else "")
        return (
            f"p{self.tail_percentile:g} above {above} in {self.windows} of the last "
            f"{self.of_windows} windows, and offender {joiner.join(conditions)}{burst}"
        )

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Limits:
    cooldown_s: float
    max_actions_per_hour: int
    revert_after_quiet_s: float | None  # None = never
    min_cpus: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    priority: int
    match: Match
    trigger: Trigger
    steps: tuple[Step, ...]
    limits: Limits
    location: Location  # where the [[policy]] header is

    def same_ladder(self, other: "Policy") -> bool:
        return len(self.steps) == len(other.steps) and all(a.same_action(b) for a, b in zip(self.steps, other.steps))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "priority": self.priority,
            "location": str(self.location),
            "match": self.match.to_json(),
            "specificity": self.match.specificity,
            "trigger": self.trigger.to_json(),
            "steps": [step.to_json() for step in self.steps],
            "limits": self.limits.to_json(),
        }


@dataclass(frozen=True)
class PolicySet:
    policies: tuple[Policy, ...]  # in file order (sorted paths), then position: the last tie-breaker
    warnings: tuple[Diagnostic, ...] = ()
    # select() per process is asked every tick; a process's facts (ProcessInfo) decide the answer.
    _selected: dict = field(default_factory=dict, compare=False, repr=False)

    def matching(self, info: ProcessInfo) -> list[tuple[Policy, MatchResult]]:
        """Every policy that matches `info`, the winner first."""
        found = []
        for order, policy in enumerate(self.policies):
            result = policy.match.matches(info)
            if result is not None:
                found.append((order, policy, result))
        found.sort(key=lambda item: (-item[1].priority, -item[1].match.specificity, item[0]))
        return [(policy, result) for _, policy, result in found]

    def select(self, info: ProcessInfo) -> tuple[Policy, MatchResult] | None:
        """The policy that governs `info` after precedence, with how it matched; None if none matches."""
        if info in self._selected:
            return self._selected[info]
        found = self.matching(info)
        if len(self._selected) >= 4096:
            self._selected.clear()
        self._selected[info] = found[0] if found else None
        return self._selected[info]

    @cached_property
    def covers_descendants(self) -> bool:
        """Whether any policy also governs the descendants of what it matches (a tree policy):
        without one, no process is governed through its ancestors."""
        return any(policy.match.descendants for policy in self.policies)

    @cached_property
    def tail_rules(self) -> tuple[tuple[Trigger, tuple[str, ...]], ...]:
        """The tail thresholds of the policies' triggers (`always` has none) as distinct rules, each
        with the names of the policies that share it: the engine works out each rule's threshold
        once a tick, not once per policy (the shipped policies share a few)."""
        rules: dict[tuple, tuple[Trigger, list[str]]] = {}
        for policy in self.policies:
            trigger = policy.trigger
            if trigger.always:
                continue
            key = (trigger.tail_percentile or 99.0, trigger.tail_above_us, trigger.tail_baseline_factor,
                   trigger.tail_at_least_us, trigger.tail_at_most_us)
            rules.setdefault(key, (trigger, []))[1].append(policy.name)
        return tuple((trigger, tuple(names)) for trigger, names in rules.values())

    @cached_property
    def relative_percentiles(self) -> frozenset[float]:
        """The percentiles that a trigger relative to the learned baseline watches."""
        return frozenset(policy.trigger.tail_percentile or 99.0 for policy in self.policies if policy.trigger.relative)

    @cached_property
    def judged_by_sketch(self) -> bool:
        """Whether a process's sketch (ProcFS.sketch: comm, exe, cmdline, ancestors) says which of
        these policies governs it: none matches on cgroup, unit or user."""
        return not any(policy.match.cgroup or policy.match.unit or policy.match.user for policy in self.policies)

    @cached_property
    def matches_user(self) -> bool:
        """Whether a policy matches on user: a process's uids then count for which policy governs it."""
        return any(policy.match.user for policy in self.policies)

    def by_name(self, name: str) -> Policy | None:
        for policy in self.policies:
            if policy.name == name:
                return policy
        return None


STATUSES = (
    "applied",
    "would-apply",
    "unchanged",
    "gone",
    "denied",
    "invalid",
    "refused",
    "restored",
    "left-changed-by-other",
    "dropped",
    "failed",
)
ERROR_STATUSES = frozenset({"denied", "invalid", "failed"})
# Not an error: what remediator set was changed by someone else since, and their value stands.
LEFT_BY_OTHER = "left-changed-by-other"


@dataclass(frozen=True)
class ActionRequest:
    identity: ProcessIdentity
    kind: str  # an action kind: "nice" | "sched" | "affinity" | "cpu" | "cpuset"
    policy: str
    step_index: int
    # What the kind's actuator takes, JSON-friendly (ActionKind.target): {"nice": 10}, {"cpus": [1]},
    # {"cgroup": "log-shippers", "cpus": [1]}, {"cpu": {"weight": 10}, "group": "log-shippers"}.
    params: Mapping[str, Any] = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)  # opaque; stored with the journal entry

    def target(self) -> dict:
        """The request as the actuators take it (JSON-friendly)."""
        return dict(self.params)


@dataclass(frozen=True)
class Outcome:
    status: str  # one of STATUSES
    kind: str
    identity: ProcessIdentity
    message: str  # the exact change, or the reason, on one line
    original: dict | None = None
    applied: dict | None = None
    threads: int = 0
    left: dict | None = None  # what was left because someone else changed it since (RestoreResult.left)
    changed_at: float | None = None  # time.time() once a live change was in place (before its journal line)

    @property
    def is_error(self) -> bool:
        return self.status in ERROR_STATUSES

    def __str__(self) -> str:
        return f"{self.status} {self.kind} pid {self.identity.pid}: {self.message}"
