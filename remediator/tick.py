"""One tick, two callers: the daemon (live or dry-run) and `remediator replay`.

    decide -> carry out (live: the executor) or pretend (replay: every change succeeds)
           -> engine.record_outcome -> observers (audit, log lines, metrics)

Both callers run `run_tick`, so a replay of a recording takes exactly the decisions the daemon
took on it, and tells the same observers (tests/test_tick_replay.py holds them to it). What
differs is only the Carrier: the executor's outcomes, or "would-apply" for everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from .engine import Decision, EngineSettings, EngineState, decide, forget, history_for, record_outcome
from .model import LEFT_BY_OTHER, Outcome, PolicySet
from .procfs import ProcessInfo
from .sample import Sample

CARRIED_KINDS = frozenset({"act", "revert"})
FORGET_STATUSES = frozenset({"gone", "dropped"})


class Carrier(Protocol):
    """Carries out the engine's act and revert decisions; `mode` goes into every audit line."""

    mode: str  # "live" | "dry-run" | "replay"

    def apply(self, decision: Decision, protected_pids: Sequence[int], policies: PolicySet) -> Outcome: ...

    def revert(self, decision: Decision) -> Outcome: ...

    def maintain(self) -> list[Outcome]: ...


class ExecutorCarrier:
    """The daemon's: the executor changes (live) or describes (dry-run) each step, journal first."""

    def __init__(self, executor, mode: str):
        self.executor = executor
        self.mode = mode

    def apply(self, decision: Decision, protected_pids: Sequence[int], policies: PolicySet) -> Outcome:
        return self.executor.apply(decision.request, protected_pids, policies)

    def revert(self, decision: Decision) -> Outcome:
        """Every change of the process given back, summed up as one outcome."""
        outcomes = self.executor.restore(decision.identity)
        if not outcomes:
            status = "would-apply" if self.mode == "dry-run" else "unchanged"
            message = "would restore the originals" if self.mode == "dry-run" else "nothing left to restore"
            return Outcome(status, "all", decision.identity, message)
        errors = [o for o in outcomes if o.is_error]
        if errors:
            status = errors[0].status
        elif all(o.status == "gone" for o in outcomes):
            status = "gone"
        elif all(o.status == LEFT_BY_OTHER for o in outcomes):
            status = LEFT_BY_OTHER  # nothing given back: someone else changed all that we had set
        else:
            status = "restored"
        left = {o.kind: o.left for o in outcomes if o.left} or None
        return Outcome(status, "all", decision.identity, "; ".join(o.message for o in outcomes), left=left)

    def maintain(self) -> list[Outcome]:
        return self.executor.maintain()


class PretendCarrier:
    """Replay's: nothing runs, and every change is assumed to succeed."""

    mode = "replay"

    def apply(self, decision: Decision, protected_pids: Sequence[int], policies: PolicySet) -> Outcome:
        return Outcome("would-apply", decision.request.kind if decision.request else "all", decision.identity,
                       decision.message)

    def revert(self, decision: Decision) -> Outcome:
        return Outcome("would-apply", "all", decision.identity, decision.message)

    def maintain(self) -> list[Outcome]:
        return []


@dataclass(frozen=True)
class Carried:
    """One decision and what came of it. `before` is the engine state the decision was taken in
    (a revert's ladder position is there: after it the remediation is reset)."""

    decision: Decision
    outcome: Outcome | None
    mode: str
    before: EngineState


@dataclass(frozen=True)
class TickReport:
    """What one tick saw and did, for the observers that look at the whole tick (metrics)."""

    sample: Sample
    policies: PolicySet
    settings: EngineSettings
    state: EngineState  # after the tick
    mode: str
    carried: tuple[Carried, ...]
    housekeeping: tuple[Outcome, ...] = ()  # maintain's outcomes (live only)
    duration_s: float = 0.0  # the tick's own work, sample excluded (0 in a replay: not measured)


class TickObserver(Protocol):
    """A consumer of the tick. Method names only: an attribute of the same name would shadow one."""

    def on_decision(self, carried: Carried) -> None: ...

    def on_outcome(self, when: str, outcome: Outcome, mode: str) -> None: ...

    def on_tick(self, report: TickReport) -> None: ...


@dataclass
class Observers:
    """Tells every observer, in order; one that raises does not keep the others from hearing."""

    members: list = field(default_factory=list)
    on_error: Callable[[object, Exception], None] | None = None

    def _each(self, method: str, *args) -> None:
        for member in self.members:
            try:
                getattr(member, method)(*args)
            except Exception as exc:  # an observer (metrics, a log line) must never stop the loop
                if self.on_error is None:
                    raise
                self.on_error(member, exc)

    def decision(self, carried: Carried) -> None:
        self._each("on_decision", carried)

    def outcome(self, when: str, outcome: Outcome, mode: str) -> None:
        self._each("on_outcome", when, outcome, mode)

    def tick(self, report: TickReport) -> None:
        self._each("on_tick", report)


def engine_settings(policies: PolicySet, tick_s: float, request: frozenset[int], online: frozenset[int],
                    max_changes_per_minute: int, self_pid: int, self_start_time: int | None = None) -> EngineSettings:
    """The engine's settings, the same way for live and replay. (self_pid, self_start_time):
    remediator's own identity; a replay has none (nothing in a recording is the replay)."""
    history_s, history_windows = history_for(policies, tick_s)
    return EngineSettings(
        request_cpus=frozenset(request) & online,
        online_cpus=online,
        max_changes_per_minute=max_changes_per_minute,
        self_pid=self_pid,
        self_start_time=self_start_time,
        history_s=history_s,
        history_windows=history_windows,
    )


def carry_out(state: EngineState, decision: Decision, carrier: Carrier, policies: PolicySet,
              protected_pids: Sequence[int]) -> tuple[EngineState, Outcome | None]:
    """One decision: act and revert go to the carrier and back into the engine; the others are
    only told (verify, exhausted, capped, excluded, infeasible)."""
    if decision.kind not in CARRIED_KINDS:
        return state, None
    outcome = carrier.apply(decision, protected_pids, policies) if decision.kind == "act" else carrier.revert(decision)
    return record_outcome(state, decision, outcome.status, policies), outcome


def carry_out_decisions(
    state: EngineState,
    decisions: Iterable[Decision],
    carrier: Carrier,
    policies: PolicySet,
    protected_pids: Sequence[int],
    observers: Observers,
    checkpoint: Callable[[EngineState], None] | None = None,
) -> tuple[EngineState, list[Carried]]:
    carried = []
    for decision in decisions:
        before = state
        state, outcome = carry_out(state, decision, carrier, policies, protected_pids)
        if outcome is not None and checkpoint is not None:
            checkpoint(state)  # the count before anything else: a crash now must not forget this change
        done = Carried(decision, outcome, carrier.mode, before)
        observers.decision(done)
        carried.append(done)
    return state, carried


def run_tick(
    state: EngineState,
    sample: Sample,
    policies: PolicySet,
    settings: EngineSettings,
    carrier: Carrier,
    observers: Observers,
    *,
    discovered: Iterable[ProcessInfo] = (),
    checkpoint: Callable[[EngineState], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> tuple[EngineState, TickReport]:
    """Decide on one sample, carry the decisions out, keep the changes in place on new threads, and
    tell the observers. `clock` (the daemon's) times the tick; a replay passes none."""
    started = clock() if clock else 0.0
    execs = [sample.processes[pid] for pid in sample.execs if pid in sample.processes]
    state, decisions = decide(state, sample, policies, settings, list(discovered) + execs)
    state, carried = carry_out_decisions(state, decisions, carrier, policies, sample.protected.pids, observers,
                                         checkpoint)
    housekeeping = []
    for outcome in carrier.maintain():
        if outcome.status in FORGET_STATUSES:
            state = forget(state, outcome.identity)
        observers.outcome("maintain", outcome, carrier.mode)
        housekeeping.append(outcome)
    duration = (clock() - started) if clock else 0.0
    report = TickReport(sample, policies, settings, state, carrier.mode, tuple(carried), tuple(housekeeping), duration)
    observers.tick(report)
    return state, report


def replay_samples(samples: Iterable[Sample], policies: PolicySet, settings: EngineSettings,
                   observers: Observers) -> EngineState:
    """Every sample through run_tick with the PretendCarrier: what these policies would have done."""
    state = EngineState()
    carrier = PretendCarrier()
    for sample in samples:
        state, _ = run_tick(state, sample, policies, settings, carrier, observers)
    return state


__all__ = [
    "Carried", "Carrier", "ExecutorCarrier", "Observers", "PretendCarrier", "TickObserver",
    "TickReport", "carry_out", "carry_out_decisions", "engine_settings", "replay_samples", "run_tick",
]
