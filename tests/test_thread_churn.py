"""A process that churns threads under a per-thread step costs the journal and the daemon's memory
what its live threads hold, not every thread it ever had; and a restore still gives every live
thread its own original, after a crash too.

The attack from the security review: a process at the affinity step widens its main thread's mask
again (sched_setaffinity(0, all)) and spawns short-lived threads without end. maintain() narrows each
new thread; before the fix every applied record carried every thread ever seen (dead ones too), once
a tick, and the journal kept every record in memory: N^2 on disk and in memory.

The process lives in a fake /proc tree (its threads are directories under task/) and its threads'
masks and nice values in FakeThreads, so a round of churn is a few directory operations.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from helpers.faults import FakeThreads
from helpers.policy_procs import add_process, make_proc_root, make_sys_root
from remediator import journal as journal_module
from remediator.actuators import default_actuators
from remediator.executor import MAINTAIN_JOURNAL_INTERVAL_S, Executor
from remediator.journal import Journal, load_entries
from remediator.model import ActionRequest
from remediator.procfs import Boot, ProcessIdentity, ProcFS

ALL = frozenset({0, 1, 2, 3})
PID, START = 300, 1030
IDENTITY = ProcessIdentity(PID, START)
BOOT = Boot("churn-test-boot", 0.0)


class Churner:
    """One process (pid 300) on a fake host with CPUs 0-3, the executor that changes it, and a clock."""

    def __init__(self, tmp_path: Path, threads: dict[int, frozenset[int]] | None = None):
        self.proc = make_proc_root(tmp_path)
        add_process(self.proc, 1, "systemd", ppid=0, start=1)
        add_process(self.proc, PID, "gzip", start=START, threads={PID: (0, "0-3")})
        self.sysfs = make_sys_root(tmp_path, "0-3")
        self.threads = FakeThreads(ALL)
        self.threads.add(PID)
        for tid, mask in (threads or {}).items():
            self.spawn_tid(tid, mask)
        self.next_tid = max([PID, *(threads or {})]) + 1
        self.now = 1000.0
        self.path = tmp_path / "journal.jsonl"
        self.executor = self.new_executor()

    def new_executor(self) -> Executor:
        """An executor on the journal file as it is (a restart, or `remediator revert`)."""
        procfs = ProcFS(self.proc)
        journal = Journal(self.path, clock=lambda: self.now, boot=BOOT)
        actuators = default_actuators(procfs, syscalls=self.threads, cpuset_mount=None, cpu_mount=None, systemd=None,
                                      sysfs_root=self.sysfs)
        return Executor(journal, procfs, dry_run=False, actuators=actuators, self_pid=0)

    def crash(self) -> Executor:
        """The daemon dies without restoring anything; a new one opens the same journal."""
        self.executor.journal.close()
        self.executor = self.new_executor()
        return self.executor

    def apply(self, kind: str, params: dict):
        return self.executor.apply(ActionRequest(IDENTITY, kind, "churners", 0, params), ())

    def spawn_tid(self, tid: int, mask: frozenset[int] | None = None, nice: int | None = None) -> int:
        """A new thread: it inherits the main thread's mask and nice unless given its own."""
        (self.proc / str(PID) / "task" / str(tid)).mkdir()
        self.threads.add(tid, nice=self.threads.nice[PID] if nice is None else nice,
                         mask=self.threads.masks[PID] if mask is None else mask)
        return tid

    def spawn(self, count: int, mask: frozenset[int] | None = None) -> list[int]:
        tids = []
        for _ in range(count):
            tids.append(self.spawn_tid(self.next_tid, mask))
            self.next_tid += 1
        return tids

    def exit(self, tids) -> None:
        for tid in tids:
            (self.proc / str(PID) / "task" / str(tid)).rmdir()
            del self.threads.nice[tid], self.threads.masks[tid]

    def live(self) -> set[int]:
        return {int(name.name) for name in (self.proc / str(PID) / "task").iterdir()}

    def journal_size(self) -> int:
        return self.path.stat().st_size

    def applied_records(self) -> list[dict]:
        return [record for record in map(json.loads, self.path.read_text().splitlines()) if record["op"] == "applied"]

    def churn(self, rounds: int, per_round: int, seconds_per_round: float, alive: list[int] | None = None) -> list[int]:
        """Rounds of: the threads of the last round exit, `per_round` new ones start (with the main
        thread's wide mask), the clock moves on, maintain() runs. Returns the threads alive at the end."""
        alive = list(alive or [])
        for _ in range(rounds):
            self.exit(alive)
            alive = self.spawn(per_round)
            self.now += seconds_per_round
            self.executor.maintain()
            self.threads.calls.clear()  # the fake's log of calls would grow with the test itself
        return alive


@pytest.fixture
def churner(tmp_path):
    found = Churner(tmp_path)
    yield found
    found.executor.journal.close()


def at_the_affinity_step(churner: Churner, cpus=(1,)) -> None:
    """The step is in place, and the process has widened its main thread's mask again."""
    outcome = churner.apply("affinity", {"cpus": list(cpus)})
    assert outcome.status == "applied", outcome
    churner.threads.masks[PID] = ALL


# -- the review's attack ----------------------------------------------------------------------------

def bytes_for(live_threads: int) -> int:
    """What one applied record may cost: a fixed part, and a tid in `tids` plus a tid and a mask in `set` per live thread."""
    return 400 + 40 * live_threads


def test_churn_costs_each_round_a_record_the_size_of_the_live_threads(churner):
    at_the_affinity_step(churner)
    alive: list[int] = []
    for round_number in range(40):
        churner.exit(alive)
        alive = churner.spawn(30)
        churner.now += MAINTAIN_JOURNAL_INTERVAL_S  # every round may journal
        before = churner.journal_size()
        [outcome] = churner.executor.maintain()
        assert outcome.status == "applied" and outcome.threads == 30, outcome
        written = churner.journal_size() - before
        live = len(churner.live())
        assert 0 < written <= bytes_for(live), f"round {round_number}: {written} bytes for {live} live threads"
        last = churner.applied_records()[-1]["applied"]
        assert {int(tid) for tid in last["set"]} <= churner.live() and set(last["tids"]) <= churner.live()
    # Every new thread got the step all the same; the main thread's own widening is left.
    assert {tid: churner.threads.masks[tid] for tid in alive} == {tid: frozenset({1}) for tid in alive}
    assert churner.threads.masks[PID] == ALL


def test_new_threads_are_changed_every_tick_but_journalled_at_most_once_per_interval(churner):
    at_the_affinity_step(churner)
    records_before = len(churner.applied_records())
    alive: list[int] = []
    ticks = 80
    for _ in range(ticks):  # 20 s at 4 ticks a second
        churner.exit(alive)
        alive = churner.spawn(25)
        churner.now += 0.25
        [outcome] = churner.executor.maintain()
        assert outcome.threads == 25 and all(churner.threads.masks[tid] == {1} for tid in alive), outcome
    written = len(churner.applied_records()) - records_before
    assert 1 <= written <= 1 + ticks * 0.25 / MAINTAIN_JOURNAL_INTERVAL_S


def test_memory_for_one_churning_entry_does_not_grow_with_the_threads_it_ever_had(churner):
    at_the_affinity_step(churner)
    package = str(Path(journal_module.__file__).parent)
    alive = churner.churn(10, 50, MAINTAIN_JOURNAL_INTERVAL_S)
    tracemalloc.start()
    try:
        alive = churner.churn(10, 50, MAINTAIN_JOURNAL_INTERVAL_S, alive)
        early = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f"{package}/*")])
        alive = churner.churn(60, 50, MAINTAIN_JOURNAL_INTERVAL_S, alive)
        late = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, f"{package}/*")])
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in late.compare_to(early, "filename"))
    # 3000 more threads came and went: the records and thread sets of all of them would be megabytes.
    assert grown < 64 * 1024, f"{grown} bytes more after 60 more rounds"


def test_a_long_churn_keeps_the_journal_file_bounded_and_restorable(churner, monkeypatch):
    monkeypatch.setattr(journal_module, "COMPACT_AT_BYTES", 16 * 1024)
    at_the_affinity_step(churner)
    alive: list[int] = []
    sizes = []
    for _ in range(150):
        alive = churner.churn(1, 30, MAINTAIN_JOURNAL_INTERVAL_S, alive)
        sizes.append(churner.journal_size())
    assert max(sizes) < 16 * 1024 + bytes_for(len(churner.live()))  # about 150 KB written in all
    assert {op for op in (json.loads(line)["op"] for line in churner.path.read_text().splitlines())} == {"intent", "applied"}
    [outcome] = churner.crash().restore()
    assert outcome.status == "restored"
    assert {tid: churner.threads.masks[tid] for tid in alive} == {tid: ALL for tid in alive}


# -- what a restore gives back ----------------------------------------------------------------------

def test_a_restore_after_churn_and_a_crash_gives_every_live_thread_its_original(tmp_path):
    own, pinned, reset_by_operator = 301, 302, 303
    churner = Churner(tmp_path, {own: frozenset({0, 1}), pinned: frozenset({1}), reset_by_operator: ALL})
    try:
        at_the_affinity_step(churner)
        assert churner.threads.masks[own] == {1} and churner.threads.masks[reset_by_operator] == {1}
        churner.threads.masks[reset_by_operator] = frozenset({3})  # an operator's taskset since
        alive = churner.churn(10, 20, MAINTAIN_JOURNAL_INTERVAL_S)  # journalled
        alive = churner.churn(3, 20, 1.0, alive)  # changed within the interval: not on disk yet
        on_disk = {int(tid) for tid in churner.applied_records()[-1]["applied"]["set"]}
        assert not set(alive) <= on_disk  # some of the live threads are ours by their value alone

        restorer = churner.crash()
        [outcome] = restorer.restore()
        assert outcome.status == "restored", outcome
        assert outcome.left == {"threads": {str(reset_by_operator): {"now": [3], "set": [1]}}}
        assert f"tid {reset_by_operator} is 3 (remediator set 1)" in outcome.message
        masks = churner.threads.masks
        assert (masks[PID], masks[own], masks[pinned], masks[reset_by_operator]) == (ALL, {0, 1}, {1}, {3})
        assert {tid: masks[tid] for tid in alive} == {tid: ALL for tid in alive}  # born later: the main thread's original
        assert restorer.active() == []
    finally:
        churner.executor.journal.close()


def test_a_restore_in_the_same_run_knows_the_threads_changed_within_the_interval(churner):
    at_the_affinity_step(churner)
    alive = churner.churn(1, 5, MAINTAIN_JOURNAL_INTERVAL_S)
    later = churner.churn(1, 5, 1.0, alive)  # not journalled yet
    churner.threads.masks[later[0]] = frozenset({2})  # the thread re-pinned itself since
    [outcome] = churner.executor.restore()
    assert outcome.status == "restored"
    assert outcome.left == {"threads": {str(later[0]): {"now": [2], "set": [1]}}}  # ours, changed since: said so
    assert [churner.threads.masks[tid] for tid in later] == [frozenset({2})] + [ALL] * 4


def test_a_value_set_on_an_exited_thread_stays_ours_while_a_thread_that_inherited_it_lives(churner):
    at_the_affinity_step(churner, cpus=(1, 2))
    [parent] = churner.spawn(1, mask=frozenset({0, 1}))
    churner.now += MAINTAIN_JOURNAL_INTERVAL_S
    churner.executor.maintain()
    assert churner.threads.masks[parent] == {1}  # the overlap: no CPU it did not have
    [child] = churner.spawn(1, mask=churner.threads.masks[parent])  # the parent's {1}: within the step, left
    churner.exit([parent])
    churner.spawn(1)  # and something to journal: a thread with the main thread's wide mask
    churner.now += MAINTAIN_JOURNAL_INTERVAL_S
    churner.executor.maintain()
    last = churner.applied_records()[-1]["applied"]
    assert str(parent) not in last["set"] and last["inherited"] == [[1]]

    [outcome] = churner.crash().restore()
    assert outcome.status == "restored"
    assert churner.threads.masks[child] == ALL  # it held remediator's {1}: the main thread's original back


def test_an_inherited_value_is_dropped_once_no_thread_holds_it(churner):
    at_the_affinity_step(churner, cpus=(1, 2))
    [parent] = churner.spawn(1, mask=frozenset({0, 1}))
    churner.now += MAINTAIN_JOURNAL_INTERVAL_S
    churner.executor.maintain()
    [child] = churner.spawn(1, mask=frozenset({1}))
    churner.exit([parent])
    alive = churner.churn(1, 1, MAINTAIN_JOURNAL_INTERVAL_S)
    assert churner.applied_records()[-1]["applied"]["inherited"] == [[1]]
    churner.exit([child])
    churner.churn(1, 1, MAINTAIN_JOURNAL_INTERVAL_S, alive)
    assert "inherited" not in churner.applied_records()[-1]["applied"]


def test_a_value_the_journal_does_not_cover_yet_waits_for_the_next_write(churner):
    # Within the interval a new thread is changed only to a value a restore from the journal would
    # give back; {1} (the overlap of {0,1} with a step of {1,2}) is not one yet.
    at_the_affinity_step(churner, cpus=(1, 2))
    churner.churn(1, 1, MAINTAIN_JOURNAL_INTERVAL_S)  # journalled now: the interval begins
    [partial] = churner.spawn(1, mask=frozenset({0, 1}))
    churner.now += 1.0
    assert churner.executor.maintain() == []
    assert churner.threads.masks[partial] == {0, 1}
    churner.now += MAINTAIN_JOURNAL_INTERVAL_S
    [outcome] = churner.executor.maintain()
    assert outcome.threads == 1 and churner.threads.masks[partial] == {1}
    assert churner.applied_records()[-1]["applied"]["set"][str(partial)] == [1]  # journalled in the same round


def test_nice_churn_is_bounded_the_same_way(churner):
    assert churner.apply("nice", {"nice": 10}).status == "applied"
    churner.threads.nice[PID] = 0  # the main thread resets its own nice; its new threads inherit 0
    alive: list[int] = []
    for _ in range(30):
        churner.exit(alive)
        alive = churner.spawn(30)
        churner.now += MAINTAIN_JOURNAL_INTERVAL_S
        before = churner.journal_size()
        churner.executor.maintain()
        assert churner.journal_size() - before <= bytes_for(len(churner.live()))
    assert {churner.threads.nice[tid] for tid in alive} == {10}
    [outcome] = churner.crash().restore()
    assert outcome.status == "restored"
    assert {churner.threads.nice[tid] for tid in alive} == {0}


# -- journals written before the fix ----------------------------------------------------------------

def test_a_journal_in_the_old_shape_still_restores(tmp_path):
    """Applied records as they were written before: the whole `set` and `tids` of every thread ever
    seen (exited ones too), one record per round, no `inherited`."""
    own, later, exited, stranger = 301, 402, 401, 403
    churner = Churner(tmp_path, {own: frozenset({1}), later: frozenset({1}), stranger: frozenset({0, 2})})
    churner.threads.masks[PID] = frozenset({1})
    entry = "0ldshape0ldshape"
    original = {"threads": {str(PID): sorted(ALL), str(own): [0, 1]}, "default": sorted(ALL)}
    lines = [
        {"op": "intent", "entry": entry, "pid": PID, "start_time": START, "kind": "affinity", "policy": "churners", "step": 0,
         "original": original, "target": {"cpus": [1], "requested": [1], "set": {str(PID): [1], str(own): [1]}},
         "evidence": {}, "boot_id": BOOT.boot_id, "time": 900.0, "v": 1},
        {"op": "applied", "entry": entry, "time": 901.0, "v": 1,
         "applied": {"cpus": [1], "requested": [1], "tids": [PID, own], "set": {str(PID): [1], str(own): [1]}}},
        {"op": "applied", "entry": entry, "time": 902.0, "v": 1,
         "applied": {"cpus": [1], "requested": [1], "tids": [PID, own, exited],
                     "set": {str(PID): [1], str(own): [1], str(exited): [1]}}},
        {"op": "applied", "entry": entry, "time": 903.0, "v": 1,
         "applied": {"cpus": [1], "requested": [1], "tids": [PID, own, exited, later],
                     "set": {str(PID): [1], str(own): [1], str(exited): [1], str(later): [1]}}},
    ]
    churner.executor.journal.close()
    churner.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    restorer = churner.new_executor()
    churner.executor = restorer
    try:
        [outcome] = restorer.restore()
    finally:
        restorer.journal.close()
    assert outcome.status == "restored", outcome
    masks = churner.threads.masks
    assert (masks[PID], masks[own], masks[later]) == (ALL, {0, 1}, ALL)
    assert masks[stranger] == {0, 2}  # never ours: left
    assert [entry.state for entry in load_entries(churner.path)] == ["restored"]


def test_an_old_shape_entry_is_maintained_into_the_new_shape(tmp_path):
    exited = 401
    churner = Churner(tmp_path)
    churner.threads.masks[PID] = frozenset({1})
    entry = "0ldshape0ldshape"
    lines = [
        {"op": "intent", "entry": entry, "pid": PID, "start_time": START, "kind": "affinity", "policy": "churners", "step": 0,
         "original": {"threads": {str(PID): sorted(ALL)}, "default": sorted(ALL)}, "target": {"cpus": [1]},
         "evidence": {}, "boot_id": BOOT.boot_id, "time": 900.0, "v": 1},
        {"op": "applied", "entry": entry, "time": 901.0, "v": 1,
         "applied": {"cpus": [1], "tids": [PID, exited], "set": {str(PID): [1], str(exited): [1]}}},
    ]
    churner.executor.journal.close()
    churner.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    churner.executor = churner.new_executor()
    assert churner.executor.reconcile("keep")[0].status == "unchanged"
    churner.threads.masks[PID] = ALL
    [new] = churner.spawn(1)
    [outcome] = churner.executor.maintain()
    assert outcome.threads == 1
    assert churner.applied_records()[-1]["applied"] == {
        "cpus": [1], "tids": [PID, new], "set": {str(PID): [1], str(new): [1]},
    }
    churner.executor.journal.close()
