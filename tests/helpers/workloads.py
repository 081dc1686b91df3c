"""Start workload processes for tests and always kill them, even when the test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"


def _all_cpus() -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


class Workload:
    """A started workload; `pid` is its process, `ready` the line it announced itself with."""

    def __init__(self, argv: list[str], ready_timeout: float = 10.0, own_session: bool = True, **popen_kwargs):
        # Its own process group either way, so kill() takes its children too. A session of its own
        # also means an autogroup of its own (sched_autogroup_enabled = 1), and nice weighs nothing
        # between autogroups: a test that needs a nice step to work keeps the test's session.
        group = {"start_new_session": True} if own_session else {"process_group": 0}
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_all_cpus,  # not whatever CPUs the test process itself was kept to
            **group,
            **popen_kwargs,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("ready") or not line:
                break
        if not line.startswith("ready"):
            self.kill()
            raise RuntimeError(f"workload {argv} did not start (exit {self.proc.poll()})")
        self.ready = dict(field.split("=", 1) for field in line.split()[1:] if "=" in field)

    def read_line(self, timeout: float = 10.0) -> str:
        """The next line the workload prints (e.g. 'worker tid=123')."""
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("workload printed nothing")
        return self.proc.stdout.readline().strip()

    def tids(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def hog_argv(comm: str = "fluent-bit", threads: int = 2, *extra: str) -> list[str]:
    return [sys.executable, str(WORKLOADS / "hog.py"), "--comm", comm, "--threads", str(threads), *extra]


def pin_workers(workload: "Workload", cpus: tuple[int, ...]) -> dict[int, int]:
    """Pin a hog's compressing threads, in thread-id order, to `cpus` (one CPU each);
    returns {tid: cpu}. Left to the load balancer, they sometimes all sit on the other CPU for
    seconds, and then the victim has no neighbour at all."""
    workers = [tid for tid in workload.tids() if tid != workload.pid]  # the main thread only waits
    placed = dict(zip(workers, cpus))
    for tid, cpu in placed.items():
        os.sched_setaffinity(tid, {cpu})
    return placed


def victim_argv(cpu: int | None = 0, *extra: str) -> list[str]:
    argv = [sys.executable, str(WORKLOADS / "victim.py")]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    return argv + list(extra)


def certain_harm(spawn, *hog_extra: str, own_session: bool = False):
    """(victim, hog) where the victim waits over 1 ms in every 250 ms window, before and after nice 10.

    The light victim (work 100 us) next to one hog thread does not: on EEVDF it preempts the hog
    at once on most wakeups and waits a tick only when it wakes inside the hog's protected slice,
    a few times per thousand wakeups, so p99.9 of a 250 ms window is over 1 ms in about half of
    the windows, in none while the balancer keeps both hog threads on CPU 1, and the ladder can
    stall for seconds. A victim working 1 ms per wakeup (half a CPU) still wins most wakeups
    against one hog thread, has stretches of seconds with few long waits (2-6 ms/s of wait), and
    once that thread is niced to 10 has none in most windows (the trigger held at 26 of 157
    ticks), so the affinity step may never come. Against two hog threads on its CPU (at nice 0
    more than its third of the CPU) it waited over 1 ms in every one of 160 windows, niced or
    not: 60-120 ms/s of wait, 80 ms/s at nice 10. So: the 1 ms victim and three compressing
    threads, two pinned to CPU 0 and one to CPU 1. Those figures were taken with victim and hog in
    sessions of their own, where nice weighs nothing (different autogroups); in one session (the
    default here, so the nice step is taken) nice 10 cut the victim's waits over 1 ms to a tenth and
    the trigger still held: the affinity step came at its settle time in every run.
    """
    victim = spawn(victim_argv(0, "--work-us", "1000"), own_session=own_session)
    hog = spawn(hog_argv("fluent-bit", 3, *hog_extra), own_session=own_session)
    pin_workers(hog, (0, 0, 1))
    return victim, hog


@pytest.fixture
def spawn():
    """spawn(argv, own_session=True, **popen_kwargs) -> Workload; every workload is killed at teardown."""
    started: list[Workload] = []

    def start(argv: list[str], **kwargs) -> Workload:
        workload = Workload(argv, **kwargs)
        started.append(workload)
        return workload

    yield start
    for workload in started:
        workload.kill()
