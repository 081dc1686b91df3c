"""Plain data shared across the pipeline's layers: what a step asks for and what came of it.

Behaviour lives above these types. The pure engine builds ActionRequests without importing the
executor, and the actuators resolve CpuSpecs without importing the TOML stack (policy -> config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpulist import format_cpulist
from .procfs import ProcessIdentity


@dataclass(frozen=True)
class CpuSpec:
    """Target CPUs of an affinity or cpuset step."""

    unprotected: bool  # resolve at run time: online CPUs minus request CPUs
    cpus: frozenset[int] = frozenset()  # explicit set when not unprotected (empty otherwise)

    def describe(self) -> str:
        return "unprotected" if self.unprotected else format_cpulist(self.cpus)


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
    kind: str  # "nice" | "sched" | "affinity" | "cpuset"
    policy: str
    step_index: int
    nice: int | None = None
    sched: str | None = None
    cpu: tuple[tuple[str, int], ...] = ()  # cpu: the setting, e.g. (("weight", 10),)
    cpus: frozenset[int] | None = None  # already resolved to concrete CPUs
    cgroup: str | None = None  # cpuset: remediator-owned cgroup name
    evidence: dict = field(default_factory=dict)  # opaque; stored with the journal entry

    def target(self) -> dict:
        """The request as the actuators take it (JSON-friendly)."""
        if self.kind == "nice":
            return {"nice": self.nice}
        if self.kind == "sched":
            return {"sched": self.sched}
        if self.kind == "cpu":
            return {"cpu": dict(self.cpu), "group": self.cgroup}
        if self.kind == "affinity":
            return {"cpus": sorted(self.cpus or ())}
        if self.kind == "cpuset":
            return {"cgroup": self.cgroup, "cpus": sorted(self.cpus or ())}
        return {}


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

    @property
    def is_error(self) -> bool:
        return self.status in ERROR_STATUSES

    def __str__(self) -> str:
        return f"{self.status} {self.kind} pid {self.identity.pid}: {self.message}"
