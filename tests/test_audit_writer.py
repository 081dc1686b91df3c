"""The audit observer's lines for outcomes outside decisions: a process that keeps making threads
under a per-thread change gets at most one "maintain" line per status a minute, the rest counted
into the next line, so no process (nor a hostile user's, made to churn) can fill the disk."""

from __future__ import annotations

import logging

from remediator.audit import MAINTAIN_LINE_EVERY_S, AuditWriter, audit_record, decision_detail
from remediator.daemon import DecisionLog
from remediator.engine import Decision
from remediator.model import Outcome
from remediator.procfs import ProcessIdentity, ProcessInfo

CHURNER, OTHER = ProcessIdentity(4242, 7), ProcessIdentity(4343, 8)
TICK_S = 0.25


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def maintained(identity: ProcessIdentity, text: str, status: str = "applied", kind: str = "affinity") -> Outcome:
    return Outcome(status, kind, identity, text)


def run_ticks(writer: AuditWriter, clock: Clock, ticks: int, outcomes) -> None:
    for tick in range(ticks):
        for outcome in outcomes(tick):
            writer.on_outcome("maintain", outcome, "live")
        writer.on_tick(None)
        clock.now += TICK_S


def test_a_churning_process_gets_a_line_a_minute_that_counts_the_rest():
    lines: list[dict] = []
    clock = Clock()
    writer = AuditWriter(lines.append, clock=clock)
    ticks = int(3 * MAINTAIN_LINE_EVERY_S / TICK_S)  # three minutes, new threads at every tick

    run_ticks(writer, clock, ticks, lambda tick: [maintained(CHURNER, f"tick {tick}: affinity 1 on 1 new thread")])

    writer.on_outcome("maintain", maintained(CHURNER, "pid 4242 is gone", "gone"), "live")

    # 720 outcomes, four lines: at once, after each minute (the newest, counting the others), and
    # what was still counted when the process went; then the end itself.
    assert [(line["change"].split(":")[0], line.get("folded", 0)) for line in lines] == [
        ("tick 0", 0), ("tick 240", 239), ("tick 480", 239), ("tick 719", 238), ("pid 4242 is gone", 0)]
    assert sum(1 + line.get("folded", 0) for line in lines[:-1]) == ticks
    assert decision_detail(lines[1]) == "tick 240: affinity 1 on 1 new thread (and 239 more like it since the last line)"
    assert all(line["decision"] == "maintain" and line["process"] == {"pid": 4242, "start_time": 7} for line in lines)

def test_every_outcome_is_written_or_counted_and_the_end_of_an_entry_at_once():
    lines: list[dict] = []
    clock = Clock()
    writer = AuditWriter(lines.append, clock=clock)
    run_ticks(writer, clock, 100, lambda tick: [maintained(CHURNER, f"tick {tick}")])

    writer.on_outcome("maintain", maintained(CHURNER, "pid 4242 is gone", "gone"), "live")

    # The first line, then the fold of the other 99 at the end, then the end itself.
    assert [(line["outcome"], line["change"], line.get("folded", 0)) for line in lines] == [
        ("applied", "tick 0", 0), ("applied", "tick 99", 98), ("gone", "pid 4242 is gone", 0)]


def test_each_process_kind_and_status_has_its_own_fold_and_a_quiet_one_is_written_at_once():
    lines: list[dict] = []
    clock = Clock()
    writer = AuditWriter(lines.append, clock=clock)
    run_ticks(writer, clock, 4, lambda tick: [maintained(CHURNER, "a"), maintained(OTHER, "b"), maintained(CHURNER, "no", "denied"),
                                              maintained(CHURNER, "c", kind="nice")])
    assert [(line["process"]["pid"], line["outcome"], line["change"]) for line in lines] == [
        (4242, "applied", "a"), (4343, "applied", "b"), (4242, "denied", "no"), (4242, "applied", "c")]

    run_ticks(writer, clock, int(2 * MAINTAIN_LINE_EVERY_S / TICK_S), lambda tick: [])  # quiet: folds written, then dropped
    assert len(lines) == 8 and {line.get("folded") for line in lines[4:]} == {2}
    writer.on_outcome("maintain", maintained(OTHER, "again"), "live")
    assert lines[-1]["change"] == "again" and "folded" not in lines[-1]


def test_outcomes_of_other_kinds_are_never_folded():
    lines: list[dict] = []
    writer = AuditWriter(lines.append, clock=Clock())
    for _ in range(3):
        writer.on_outcome("exit", Outcome("restored", "nice", CHURNER, "nice 0 (was 10)"), "live")
    writer.on_outcome("maintain", Outcome("unchanged", "nice", CHURNER, "nothing new"), "live")
    assert len(lines) == 3


def test_the_daemon_log_folds_the_same_lines(caplog):
    """journald drops a unit's messages past its rate limit: a line a tick for one churning
    process would push the daemon's other messages out."""
    clock = Clock()
    log = DecisionLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="remediator"):
        for tick in range(100):
            log.on_outcome("maintain", maintained(CHURNER, f"tick {tick}"), "live")
            log.on_tick(None)
            clock.now += TICK_S
        log.on_outcome("maintain", maintained(CHURNER, "pid 4242 is gone", "gone"), "live")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert "tick 99" in lines[1] and lines[1].endswith("(and 98 more like it since the last line)")


def test_a_process_cannot_make_its_audit_lines_huge_with_its_arguments():
    """32 KiB of arguments (invalid UTF-8 is six bytes each in JSON) on every line of a process
    that can get many lines: an audit line keeps the first 1,024 characters and says how many more."""
    info = ProcessInfo(pid=4242, start_time=7, comm="updatedb", cmdline=("updatedb", "\ufffd" * 32000))
    record = audit_record(Decision("capped", 1.0, 1.0, info, None, "capped"), None, "live")
    assert len(record["process"]["cmdline"]) < 1100
    assert record["process"]["cmdline"].endswith("... (30985 more characters)")  # 32,009 in all
    assert audit_record(Decision("capped", 1.0, 1.0, ProcessInfo(pid=1, start_time=1, comm="x", cmdline=("x", "-v")), None, "c"),
                        None, "live")["process"]["cmdline"] == "x -v"
