"""100 SIGKILLs at random named points of apply and restore, on real processes: zero originals lost.

Each round forks a remediator (apply nice 10, affinity {1}, nice 15 as a second step, on two
processes, then restore everything) that kills itself with SIGKILL at one injection point:

    journal-write:K   in the middle of the K-th journal write (half the line on disk: a torn tail)
    journal-fsync:K   right after the K-th journal fsync returned
    set:N             right after the N-th setpriority/sched_setaffinity (a change half made)

Then a fresh executor (every tenth round: `remediator revert --all`) restores from the journal,
and every thread of both processes must be back at its exact original nice and CPU mask.
The injection lives in the forked child only (test code patching test objects); nothing in
remediator reads it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from helpers.pidreuse import SLEEPER_ARGV
from helpers.remediation import affinity_request, make_executor, nice_request, thread_masks, thread_nices
from remediator import journal as journal_module
from remediator.actuators import Syscalls

pytestmark = pytest.mark.root

ROUNDS = 100
JOURNAL_WRITES = 16  # 2 processes x (3 intents + 3 applied) + 2 x 2 restored, when nothing crashes
CHANGES = 30  # 2 processes x 3 threads x (3 steps + 2 restores)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingSyscalls(Syscalls):
    def __init__(self, after: int):
        self.after, self.count = after, 0

    def _changed(self) -> None:
        self.count += 1
        if self.count == self.after:
            die()

    def setpriority(self, tid, value):
        super().setpriority(tid, value)
        self._changed()

    def sched_setaffinity(self, tid, cpus):
        super().sched_setaffinity(tid, cpus)
        self._changed()


def crash_at(point: str) -> Syscalls:
    """Arm the injection point in this (forked) process; returns the syscalls to use."""
    name, _, number = point.partition(":")
    count = int(number)
    if name == "set":
        return DyingSyscalls(count)
    real_write, real_fsync = os.write, os.fsync
    seen = {"write": 0, "fsync": 0}

    def write(fd, data):
        seen["write"] += 1
        if name == "journal-write" and seen["write"] == count:
            real_write(fd, bytes(data[: max(1, len(data) // 2)]))
            die()
        return real_write(fd, data)

    def fsync(fd):
        real_fsync(fd)
        seen["fsync"] += 1
        if name == "journal-fsync" and seen["fsync"] == count:
            die()

    journal_module.os.write = write  # the child's own os module: gone with the child
    journal_module.os.fsync = fsync
    return Syscalls()


def apply_and_restore(journal, pids, point: str) -> None:
    """The forked remediator: runs, and dies at `point` (or exits 0 if it never got there)."""
    status = 1
    try:
        syscalls = crash_at(point)
        executor = make_executor(journal, syscalls=syscalls)
        for pid in pids:
            executor.apply(nice_request(pid, 10), ())
            executor.apply(affinity_request(pid, {1}), ())
            executor.apply(nice_request(pid, 15, step=1), ())
        executor.restore()
        status = 0
    finally:
        os._exit(status)


def random_point(rng: random.Random) -> str:
    kind = rng.choice(["journal-write", "journal-fsync", "set"])
    return f"{kind}:{rng.randint(1, CHANGES if kind == 'set' else JOURNAL_WRITES)}"


def test_100_kills_at_random_points_lose_no_original(spawn, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the affinity step needs CPU 1")
    targets = [spawn(SLEEPER_ARGV) for _ in range(2)]
    for target in targets:  # an odd thread, so per-thread originals matter
        worker = sorted(target.tids())[1]
        os.setpriority(os.PRIO_PROCESS, worker, 3)
        os.sched_setaffinity(worker, {0})
    originals = {t.pid: (thread_nices(t.pid), thread_masks(t.pid)) for t in targets}
    journal = tmp_path / "journal.jsonl"
    rng = random.Random(int(os.environ.get("REMEDIATOR_KILL9_SEED", "11")))
    killed = 0
    for round_number in range(ROUNDS):
        point = random_point(rng)
        child = os.fork()
        if child == 0:
            apply_and_restore(journal, [t.pid for t in targets], point)
        _, status = os.waitpid(child, 0)
        killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"round {round_number} ({point}): child failed"
        if round_number % 10 == 9:
            result = subprocess.run(
                [sys.executable, "-m", "remediator", "revert", "--all", "--journal", str(journal)],
                capture_output=True, text=True, timeout=60,
            )
            assert result.returncode == 0, f"round {round_number} ({point}): {result.stdout}{result.stderr}"
        else:
            executor = make_executor(journal)
            try:
                outcomes = executor.restore()
                assert not [o for o in outcomes if o.is_error], f"round {round_number} ({point}): {outcomes}"
                assert executor.active() == []
            finally:
                executor.journal.close()
        for target in targets:
            assert (thread_nices(target.pid), thread_masks(target.pid)) == originals[target.pid], (
                f"round {round_number}: killed at {point}, pid {target.pid} not restored exactly"
            )
    assert killed >= ROUNDS * 0.8  # most points are reached: the kills really happened mid-run
