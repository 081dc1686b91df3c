"""Workers the protected service forks are off limits, at any depth, wherever the safety rules are
consulted (safety.exclusion_reason): the engine's tick, `policy explain`, the executor's last check.
Ancestry is by (pid, start time): a process whose parent's pid the service took later is no worker
of it. The same for remediator's own children.

The scene: the protected `api` (pid 100) forked a `gzip` (120) and a shell (130) that forked
another `gzip` (131); an unrelated `gzip` (300) runs beside them; `gzip` 140 has ppid 100 but
started before `api` did (its parent died and `api` took the pid). A policy names gzip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.faults import FakeThreads
from helpers.policy_procs import add_process, make_proc_root
from remediator import histogram
from remediator.actuators import default_actuators
from remediator.engine import EngineSettings, EngineState, decide
from remediator.executor import Executor
from remediator.explain import explain
from remediator.journal import Journal
from remediator.model import ActionRequest
from remediator.policy import load_policies
from remediator.procfs import ProcessIdentity, ProcessInfo, ProcFS
from remediator.safety import exclusion_reason
from remediator.sample import ProcessUsage, ProtectedWaits, Sample
from remediator.selectors import ProtectSelectors

API = ProcessInfo(pid=100, start_time=10, comm="api", ppid=1)
WORKER = ProcessInfo(pid=120, start_time=50, comm="gzip", ppid=100, ancestors=((100, "api"),))
SHELL = ProcessInfo(pid=130, start_time=60, comm="sh", ppid=100, ancestors=((100, "api"),))
GRANDCHILD = ProcessInfo(pid=131, start_time=61, comm="gzip", ppid=130, ancestors=((130, "sh"), (100, "api")))
UNRELATED = ProcessInfo(pid=300, start_time=30, comm="gzip", ppid=1)
REUSED_PARENT = ProcessInfo(pid=140, start_time=5, comm="gzip", ppid=100, ancestors=((100, "api"),))
SCENE = {info.pid: info for info in (API, WORKER, SHELL, GRANDCHILD, UNRELATED, REUSED_PARENT)}
PROTECTED = (API.pid,)

CHILD_REASON = "a child of the protected service (api, pid 100)"
GRANDCHILD_REASON = "a descendant of the protected service (api, pid 100)"

POLICY = """\
[[policy]]
name = "compressors"
description = "gzip anywhere"
match.comm = ["gzip"]
trigger.tail = { percentile = 99.0, above = "2ms", windows = 1, of = 1 }
trigger.offender = { cpu = 0.5 }
[[policy.actions]]
nice = 10
"""


@pytest.fixture
def policies(tmp_path):
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "compressors.toml").write_text(POLICY)
    return load_policies([directory])


def reason(info: ProcessInfo, processes=SCENE, daemon: ProcessIdentity | None = None) -> str | None:
    return exclusion_reason(info, PROTECTED, processes=processes, daemon=daemon)


# -- the rule ---------------------------------------------------------------------------------------

def test_the_services_workers_are_off_limits_at_any_depth():
    assert reason(API) == "protected service"
    assert reason(WORKER) == CHILD_REASON
    assert reason(GRANDCHILD) == GRANDCHILD_REASON


def test_an_unrelated_process_of_the_same_name_is_not():
    assert reason(UNRELATED) is None


def test_a_parent_pid_the_service_took_later_is_no_parent():
    # ppid 100, but api started at 10 and this gzip at 5: api only took its dead parent's pid.
    assert reason(REUSED_PARENT) is None


def test_a_chain_broken_by_an_unknown_process_proves_nothing():
    # The shell is not known: its pid alone (info.ancestors) does not make 131 the service's.
    without_shell = {pid: info for pid, info in SCENE.items() if pid != SHELL.pid}
    assert reason(GRANDCHILD, without_shell) is None


def test_a_child_of_remediator_by_pid_and_start_time():
    daemon = ProcessInfo(pid=999, start_time=7, comm="remediator", ppid=1)
    child = ProcessInfo(pid=150, start_time=70, comm="gzip", ppid=999, ancestors=((999, "remediator"),))
    grandchild = ProcessInfo(pid=151, start_time=71, comm="gzip", ppid=150)
    processes = {daemon.pid: daemon, child.pid: child, grandchild.pid: grandchild}
    assert reason(daemon, processes, daemon.identity) == "remediator itself"
    assert reason(child, processes, daemon.identity) == "a child of remediator"
    assert reason(grandchild, processes, daemon.identity) == "a descendant of remediator"
    # The process at remediator's pid is another one (remediator is (999, 5)): neither it nor its children are remediator.
    assert reason(daemon, processes, ProcessIdentity(999, 5)) is None
    assert reason(child, processes, ProcessIdentity(999, 5)) is None
    assert reason(child, processes, None) is None  # remediator is not among these processes (a replay)


# -- the engine's tick ------------------------------------------------------------------------------

SETTINGS = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=30,
                          self_pid=999, self_start_time=7)
BUSY = (WORKER, GRANDCHILD, UNRELATED, REUSED_PARENT)


def hot_sample(t: float, processes=SCENE) -> Sample:
    """A tick of 250 ms where the protected p99 is 5 ms and every gzip burns a whole CPU."""
    waits = [50_000] * 100 + [5_000_000] * 4
    duration = 250_000_000
    return Sample(
        ts=1_700_000_000 + t, start_ns=int(t * 1e9) - duration, end_ns=int(t * 1e9), source="bpf", window_ns=50_000_000,
        ncpus=2,
        protected=ProtectedWaits(threads=1, pids=PROTECTED, waits=len(waits), wakeups=len(waits), preemptions=0,
                                 wait_ns=sum(waits), max_ns=max(waits),
                                 histogram=tuple(sorted(histogram.from_values(waits).items()))),
        usage=tuple(ProcessUsage(info.pid, info.comm, duration, 50_000_000) for info in BUSY),
        blame=tuple((info.pid, 5_000_000) for info in BUSY),
        cpu_busy_ns=(duration, duration),
        processes=processes,
    )


def test_the_engine_acts_on_the_unrelated_gzip_and_says_why_not_on_the_services(policies):
    state, decisions = decide(EngineState(), hot_sample(1.0), policies, SETTINGS)
    acts = {d.info.pid for d in decisions if d.kind == "act"}
    excluded = {d.info.pid: d.message for d in decisions if d.kind == "excluded"}
    assert acts == {UNRELATED.pid, REUSED_PARENT.pid}
    assert excluded == {
        WORKER.pid: f"matched by compressors (comm gzip matches 'gzip') but off limits: {CHILD_REASON}",
        GRANDCHILD.pid: f"matched by compressors (comm gzip matches 'gzip') but off limits: {GRANDCHILD_REASON}",
    }
    # Said once; never acted on while the trigger keeps holding.
    for t in (1.25, 1.5, 1.75):
        state, decisions = decide(state, hot_sample(t), policies, SETTINGS)
        assert not {d.info.pid for d in decisions} & {WORKER.pid, GRANDCHILD.pid}


# -- policy explain on a fake /proc -----------------------------------------------------------------

def fake_host(tmp_path: Path) -> Path:
    proc = make_proc_root(tmp_path)
    add_process(proc, 1, "systemd", ppid=0, start=1)
    add_process(proc, 100, "api", start=1000)
    add_process(proc, 120, "gzip", ppid=100, start=1050)
    add_process(proc, 130, "sh", ppid=100, start=1060)
    add_process(proc, 131, "gzip", ppid=130, start=1061)
    add_process(proc, 300, "gzip", start=1030)
    add_process(proc, 140, "gzip", ppid=100, start=900)  # its parent died; api took pid 100 later
    return proc


def test_explain_says_the_services_workers_are_excluded_and_why(tmp_path, policies):
    report = explain(policies, ProtectSelectors.build(comms=["api"]), ProcFS(fake_host(tmp_path)), frozenset({0, 1}),
                     request_cpus=frozenset({0}), self_pid=0, cpuset_mount=None, sched_groups=None)
    [entry] = report.to_json()["policies"]
    found = {item["pid"]: (item["status"], item.get("reason")) for item in entry["processes"]}
    assert found[120] == ("excluded", CHILD_REASON)
    assert found[131] == ("excluded", GRANDCHILD_REASON)
    assert found[300][0] == "acts" and found[140][0] == "acts"


# -- the executor's last check, on /proc as it is then ----------------------------------------------

def fake_executor(tmp_path: Path) -> tuple[Executor, FakeThreads]:
    proc = fake_host(tmp_path)
    threads = FakeThreads()
    for tid in (120, 131, 300, 140):
        threads.add(tid)
    procfs = ProcFS(proc)
    journal = Journal(tmp_path / "journal.jsonl")
    return Executor(journal, procfs, dry_run=False, actuators=default_actuators(procfs, syscalls=threads), self_pid=0), threads


def nice_request(pid: int, start_time: int) -> ActionRequest:
    return ActionRequest(ProcessIdentity(pid, start_time), "nice", "compressors", 0, {"nice": 10})


def test_the_executor_refuses_a_worker_the_engine_did_not_know_was_the_services(tmp_path):
    # The engine saw gzip 131 with its chain broken (the shell unknown) and asked; the executor
    # reads the chain from /proc and finds api above it.
    executor, threads = fake_executor(tmp_path)
    try:
        for pid, start, why in ((120, 1050, CHILD_REASON), (131, 1061, GRANDCHILD_REASON)):
            outcome = executor.apply(nice_request(pid, start), PROTECTED)
            assert outcome.status == "refused"
            assert outcome.message == f"pid {pid} (gzip) is off limits: {why}"
        assert threads.calls == [] and executor.journal.entries() == []
        assert executor.apply(nice_request(300, 1030), PROTECTED).status == "applied"
        assert executor.apply(nice_request(140, 900), PROTECTED).status == "applied"
        assert threads.nice == {120: 0, 131: 0, 300: 10, 140: 10}
    finally:
        executor.journal.close()
