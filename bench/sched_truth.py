"""The truth a blame bench measures the probes against: every scheduler event, recorded by ftrace.

While the probes measure a scene, an ftrace instance of its own (so nothing else using tracefs is
disturbed) records sched_switch, sched_wakeup(_new), sched_migrate_task and sched_process_fork of
every task. Replayed offline with nothing lost (no ring of recent runs, no race between CPUs), it
says for each of the victim's run-queue waits what ran on the queue it waited on, and for how long:
from its wakeup or preemption on a CPU, across every migration to another CPU's queue, to its
switch-in. Time on a queue whose CPU ran its idle task is nobody's (key IDLE).

Timestamps are CLOCK_MONOTONIC (the probes' clock), printed by ftrace to the microsecond; the
rounding is unbiased and spread over thousands of boundaries.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("sched_switch", "sched_wakeup", "sched_wakeup_new", "sched_migrate_task", "sched_process_fork")
IDLE = 0
UNKNOWN = -1  # a queue whose CPU had no switch yet in the trace: what ran there is not known

_LINE = re.compile(r"^\s*.+?-(?P<pid>\d+)\s+\(\s*(?P<tgid>[\d-]+)\)\s+\[(?P<cpu>\d+)\]\s+\S+\s+(?P<ts>\d+\.\d+): (?P<event>\w+): (?P<rest>.*)$")
_SWITCH = re.compile(r"prev_comm=(?P<prev_comm>.*) prev_pid=(?P<prev>\d+) prev_prio=\d+ prev_state=(?P<state>\S+) ==> "
                     r"next_comm=(?P<next_comm>.*) next_pid=(?P<next>\d+) next_prio=\d+$")
_WAKEUP = re.compile(r" pid=(?P<pid>\d+) prio=\d+ target_cpu=(?P<cpu>\d+)$")
_MIGRATE = re.compile(r" pid=(?P<pid>\d+) prio=\d+ orig_cpu=\d+ dest_cpu=(?P<cpu>\d+)$")
_FORK = re.compile(r" pid=(?P<parent>\d+) child_comm=.* child_pid=(?P<child>\d+)$")


class TraceError(RuntimeError):
    pass


class SchedTrace:
    """An ftrace instance recording the scheduler events above; `start()`, then `stop()` returns the text."""

    def __init__(self, name: str = "blame-precision", buffer_kb: int = 65536):
        self.dir = TRACEFS / "instances" / name
        self.buffer_kb = buffer_kb

    def _write(self, relative: str, value: str) -> None:
        (self.dir / relative).write_text(value)

    def start(self) -> None:
        if not (TRACEFS / "instances").is_dir():
            raise TraceError(f"{TRACEFS} is not mounted (the truth comes from ftrace)")
        self.dir.mkdir(exist_ok=True)
        self._write("tracing_on", "0")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", str(self.buffer_kb))
        self._write("options/record-tgid", "1")
        self._write("trace", "")
        for event in EVENTS:
            self._write(f"events/sched/{event}/enable", "1")
        self._write("tracing_on", "1")

    def stop(self) -> tuple[str, dict[int, int]]:
        """The recorded text and the kernel's tid -> tgid table; raises if events were lost."""
        self._write("tracing_on", "0")
        lost = 0
        for stats in sorted(self.dir.glob("per_cpu/cpu*/stats")):
            for line in stats.read_text().splitlines():
                if line.startswith("overrun:"):
                    lost += int(line.split()[1])
        text = (self.dir / "trace").read_text()
        saved = self.dir / "saved_tgids"
        table = (saved if saved.exists() else TRACEFS / "saved_tgids").read_text()
        tgids = {int(tid): int(tgid) for tid, tgid in (line.split() for line in table.splitlines())}
        if lost:
            raise TraceError(f"ftrace lost {lost} events: a bigger buffer_kb, or a shorter run")
        return text, tgids

    def close(self) -> None:
        if not self.dir.exists():
            return
        self._write("tracing_on", "0")
        for event in EVENTS:
            self._write(f"events/sched/{event}/enable", "0")
        self._write("trace", "")
        self.dir.rmdir()


@dataclass
class Truth:
    waits: int = 0
    wait_ns: int = 0
    behind: Counter = field(default_factory=Counter)  # tgid (IDLE, UNKNOWN) -> ns of the victim's wait
    comms: dict[int, str] = field(default_factory=dict)  # tgid -> a comm it ran under
    parents: dict[int, int] = field(default_factory=dict)  # process -> parent process (forks in the trace)

    def descendants(self, ancestor: int) -> set[int]:
        found, grew = set(), True
        while grew:
            grew = False
            for child, parent in self.parents.items():
                if child not in found and (parent == ancestor or parent in found):
                    found.add(child)
                    grew = True
        return found


def replay(text: str, tgids: dict[int, int], victim_tids: set[int]) -> Truth:
    """The victim's waits completed in the trace, charged to what ran on the queue of each part."""
    tgid_of = dict(tgids)
    rows = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        pid, tgid = int(match["pid"]), match["tgid"]
        if tgid.isdigit() and pid:
            tgid_of.setdefault(pid, int(tgid))
        rows.append((round(float(match["ts"]) * 1e9), int(match["cpu"]), match["event"], match["rest"]))
    rows.sort(key=lambda row: row[0])

    truth = Truth()
    runs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # cpu -> (start, end, tid)
    current: dict[int, tuple[int, int]] = {}  # cpu -> (tid, since)
    waiting: dict[int, list] = {}  # tid -> [queued_since, cpu, parts]
    parts_of_waits: list[list[tuple[int, int, int]]] = []
    for ts, cpu, event, rest in rows:
        if event == "sched_switch":
            match = _SWITCH.search(rest)
            if not match:
                raise TraceError(f"unparsed sched_switch: {rest}")
            prev, nxt = int(match["prev"]), int(match["next"])
            truth.comms.setdefault(tgid_of.get(nxt, nxt), match["next_comm"])
            if cpu in current:
                runs[cpu].append((current[cpu][1], ts, prev))
            current[cpu] = (nxt, ts)
            if prev in victim_tids and match["state"].startswith("R"):
                waiting[prev] = [ts, cpu, []]
            if nxt in waiting:
                since, queue, parts = waiting.pop(nxt)
                parts.append((queue, since, ts))
                parts_of_waits.append(parts)
        elif event in ("sched_wakeup", "sched_wakeup_new"):
            match = _WAKEUP.search(rest)
            if match and int(match["pid"]) in victim_tids:
                waiting[int(match["pid"])] = [ts, int(match["cpu"]), []]
        elif event == "sched_migrate_task":
            match = _MIGRATE.search(rest)
            if match and int(match["pid"]) in waiting:
                entry = waiting[int(match["pid"])]
                entry[2].append((entry[1], entry[0], ts))
                entry[0], entry[1] = ts, int(match["cpu"])
        elif event == "sched_process_fork":
            match = _FORK.search(rest)
            if match:
                child = int(match["child"])
                if tgid_of.get(child, child) == child:  # a process, not a thread
                    truth.parents[child] = tgid_of.get(int(match["parent"]), int(match["parent"]))
    starts = {cpu: [run[0] for run in cpu_runs] for cpu, cpu_runs in runs.items()}
    for parts in parts_of_waits:
        truth.waits += 1
        truth.wait_ns += parts[-1][2] - parts[0][1]
        for cpu, lo, hi in parts:
            cpu_runs, seen = runs.get(cpu, []), 0
            index = max(0, bisect.bisect_right(starts.get(cpu, []), lo) - 1)
            while index < len(cpu_runs) and cpu_runs[index][0] < hi:
                start, end, tid = cpu_runs[index]
                overlap = min(end, hi) - max(start, lo)
                if overlap > 0:
                    truth.behind[tgid_of.get(tid, tid) if tid else IDLE] += overlap
                    seen += overlap
                index += 1
            if hi - lo > seen:
                truth.behind[UNKNOWN] += hi - lo - seen
    return truth
