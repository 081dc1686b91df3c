"""Precise blame on real processes: a wait that migrates is charged to what ran on each run queue it
waited on, and wait time the run ring no longer holds is counted, not lost.

Runs as root with BPF, under the CPU lock (tests/README: flock /tmp/remediator-cpu.lock).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from remediator.collector import Collector
from remediator.probes import ProbeSettings
from remediator.procfs import ProcFS
from remediator.sample import merge_samples
from remediator.selectors import ProtectSelectors
from remediator.sources import BpfSource

from helpers.workloads import hog_argv, victim_argv
import test_probes_live

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("two_cpus")]

PROCFS = ProcFS()
BENCH_WORKLOADS = Path(__file__).resolve().parent.parent / "bench" / "workloads"
pin = test_probes_live.pin
two_cpus = test_probes_live.two_cpus  # the fixture: the collector keeps off CPU 0


@contextmanager
def collecting(victim_pid: int, settings: ProbeSettings | None = None):
    collector = Collector(BpfSource(PROCFS, settings), ProtectSelectors.build(pids=[victim_pid]), PROCFS)
    try:
        collector.start()
        yield collector
    finally:
        collector.close()


def observe(collector: Collector, seconds: float):
    collector.sample()
    before = collector.source.probes.snapshot().totals
    parts = []
    for _ in range(round(seconds / 0.5)):
        time.sleep(0.5)
        parts.append(collector.sample())
    after = collector.source.probes.snapshot().totals
    return merge_samples(parts), {name: after[name] - before[name] for name in after}


def test_a_wait_moved_to_another_cpu_is_charged_to_the_hog_it_waited_behind(spawn):
    """The victim waits behind a hog on CPU 0. An innocent on CPU 1 is busy 10 ms, then sleeps 10 ms
    during which it pins the victim to CPU 1 for 0.3 ms every 2 ms (as the load balancer pulls a
    waiting thread to an idle CPU): waits that began behind the hog end on CPU 1, after the innocent
    ran there. Charged where the thread is switched in, they blamed the innocent; charged to the run
    queues the thread waited on, they blame the hog."""
    victim = spawn(victim_argv(0))
    hog = spawn(hog_argv("hog", 1))
    pin(hog.pid, {0})
    innocent = spawn([sys.executable, str(BENCH_WORKLOADS / "mover.py"), "--pid", str(victim.pid), "--home", "0", "--to", "1",
                      "--busy-ms", "10", "--idle-ms", "10", "--comm", "innocent"])
    pin(innocent.pid, {1})
    reports = []
    with collecting(victim.pid) as collector:
        # A second look only when the first misses: another session's burst on CPU 1 delays the
        # innocent into its own moves, and the victim then really waits behind it (11% seen once
        # on a loaded host, 2-4% in the next runs). Charging waits where they end fails both.
        for _attempt in range(2):
            sample, totals = observe(collector, 3.0)
            waits = sample.protected
            hog_share, innocent_share = sample.blame_share(hog.pid), sample.blame_share(innocent.pid)
            reports.append(f"waits {waits.waits}, migrated {totals['migrated_waits']}, wait {waits.wait_ns / 1e6:.0f} ms: "
                           f"hog {hog_share:.1%}, innocent {innocent_share:.1%}, others {waits.blamed_ns / waits.wait_ns:.1%} "
                           f"in all, unattributed {waits.unattributed_ns / waits.wait_ns:.1%}")
            if hog_share >= 0.5 and hog_share >= 0.9 * (hog_share + innocent_share) and innocent_share <= 0.08:
                break
    report = "; then ".join(reports)
    print(report)
    # The scene moves the victim about 750 times in 3 s; some 100-200 of the moves catch it
    # waiting (99 seen once on a busy host): enough that the hog's share below is about them.
    assert totals["migrated_waits"] >= 50, report
    # Other sessions' processes on CPU 0 take their real part of the wait (up to 15% seen), so the
    # hog is judged against the scene's innocent rather than against the whole wait.
    assert hog_share >= 0.5, report
    assert hog_share >= 0.9 * (hog_share + innocent_share), report
    # The victim really waits behind the innocent after each move (it runs on CPU 1 to pin it):
    # 2-5% of the wait in ftrace replays of this scene (bench/blame_precision.py), never more.
    assert innocent_share <= 0.08, report


def test_wait_the_run_ring_no_longer_holds_is_counted_as_overflow(spawn):
    """A victim behind a hog on CPU 0, with a process and its child bouncing a byte there in bursts.
    With a ring of one run (two would hold the ping-pong's two merged segments, and lose the hog only
    now and then) most long waits outgrow it: the part it lost is counted in overflow_ns and
    unattributed_ns, and every nanosecond of the wait is accounted for once (own + others +
    unattributed = the wait)."""
    victim = spawn(victim_argv(0, "--sleep-us", "1000", "--work-us", "1000"))
    hog = spawn(hog_argv("hog", 1))
    pin(hog.pid, {0})
    spawn([sys.executable, str(BENCH_WORKLOADS / "chatter.py"), "--fork", "--cpu", "0", "--rounds", "40", "--pause-ms", "5"])
    with collecting(victim.pid, ProbeSettings(segment_ring=1)) as collector:
        sample, _ = observe(collector, 2.0)
    waits = sample.protected
    accounted = waits.own_ns + waits.blamed_ns + waits.unattributed_ns
    report = (f"wait {waits.wait_ns / 1e6:.1f} ms: others {waits.blamed_ns / 1e6:.1f}, own {waits.own_ns / 1e6:.1f}, "
              f"unattributed {waits.unattributed_ns / 1e6:.1f} of which overflow {waits.overflow_ns / 1e6:.1f} ms")
    print(report)
    assert waits.overflow_ns > 0.05 * waits.wait_ns, report
    assert waits.unattributed_ns >= waits.overflow_ns, report
    assert abs(accounted - waits.wait_ns) <= 0.02 * waits.wait_ns, report


def test_a_ping_pong_of_two_processes_does_not_push_the_hog_out_of_the_run_ring(spawn):
    """The scene above with the default ring of 16: the process and child bouncing a byte between
    the victim's waits take turns in runs of a few microseconds, hundreds per burst. Their runs share
    two slots (each spans the other's), so the hog's run that a long wait began in stays in the ring:
    almost nothing overflows and the hog carries most of the wait."""
    victim = spawn(victim_argv(0, "--sleep-us", "1000", "--work-us", "1000"))
    hog = spawn(hog_argv("hog", 1))
    pin(hog.pid, {0})
    chatter = spawn([sys.executable, str(BENCH_WORKLOADS / "chatter.py"), "--fork", "--cpu", "0", "--rounds", "40", "--pause-ms", "5"])
    with collecting(victim.pid) as collector:
        sample, _ = observe(collector, 2.0)
    waits = sample.protected
    hog_share = sample.blame_share(hog.pid)
    report = (f"wait {waits.wait_ns / 1e6:.1f} ms: hog {hog_share:.1%}, chatter {sample.blame_share(chatter.pid):.1%}, "
              f"unattributed {waits.unattributed_ns / 1e6:.1f} of which overflow {waits.overflow_ns / 1e6:.1f} ms")
    print(report)
    assert waits.overflow_ns <= 0.01 * waits.wait_ns, report
    assert hog_share >= 0.8, report
