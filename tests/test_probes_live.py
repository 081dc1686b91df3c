"""The eBPF probes on real processes: tail, blame, schedstat agreement, threads born later.

Runs as root with BPF (CI); elsewhere it skips saying why, and .ci/run fails on such a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from remediator import histogram
from remediator.collector import Collector
from remediator.procfs import ProcFS
from remediator.sample import merge_samples
from remediator.selectors import ProtectSelectors
from remediator.sources import BpfSource
from remediator.taskstats import TaskstatsCounters

from helpers.workloads import WORKLOADS, hog_argv, victim_argv

pytestmark = pytest.mark.bpf

PROCFS = ProcFS()


@contextmanager
def collecting(selectors: ProtectSelectors):
    collector = Collector(BpfSource(PROCFS), selectors, PROCFS)
    try:
        collector.start()
        yield collector
    finally:
        collector.close()


def observe(collector: Collector, seconds: float, every: float = 0.5):
    collector.sample()  # discard what happened before
    parts = []
    for _ in range(max(1, round(seconds / every))):
        time.sleep(every)
        parts.append(collector.sample())
    return merge_samples(parts)


def run_delay_ns(pid: int) -> int:
    total = 0
    for tid in PROCFS.tids(pid):
        total += PROCFS.schedstat(pid, tid)[1]
    return total


def pin(pid: int, cpus: set[int]) -> None:
    for tid in PROCFS.tids(pid):
        os.sched_setaffinity(tid, cpus)


@pytest.fixture
def two_cpus():
    if os.sched_getaffinity(0) != {0, 1}:
        pytest.skip("the scene needs exactly CPUs 0 and 1")
    # The collector runs in this process: keep it off the victim's CPU, as the daemon keeps itself
    # off the request CPUs (the workloads it starts still get both CPUs).
    os.sched_setaffinity(0, {1})
    yield
    os.sched_setaffinity(0, {0, 1})


def test_fluent_bit_hog_is_blamed_and_leaves_when_pinned_away(spawn, two_cpus):
    """The issue's scene: victim pinned to CPU 0 (sleep 1 ms, work 100 us), a two-thread hog.

    Uncontended and contended phases alternate (the hog stopped with SIGSTOP, then resumed) so the
    machine's own noise falls on both alike. On EEVDF kernels (6.6+) a sleeper this light preempts
    the hog on most wakeups; the waits that land inside the hog's protected slice last until the
    next tick (4 ms at HZ=250). They are 0.6-1.8 per thousand wakeups here, so even p99.9 sits on
    their edge and flips between runs, while uncontended the longest waits are the idle CPU's
    wake-up cost (under 1.2 ms, with no process to blame) with rarely a longer one. The test
    therefore counts the waits of 2 ms or more, the hog's tick-long ones: at least five, and at
    least twice as many as without the hog. It prints p99 and p99.9.
    """
    victim = spawn(victim_argv(0))
    hog = spawn(hog_argv("fluent-bit", 2))

    def tail(samples):
        counts = Counter()
        for sample in samples:
            counts.update(sample.protected.counts())
        tick_long = sum(count for slot, count in counts.items() if slot >= histogram.slot_of(2_000_000))
        return histogram.percentile(counts, 99) / 1e3, histogram.percentile(counts, 99.9) / 1e3, tick_long

    def blame_share(samples, pid):
        return sum(s.blame_of(pid) for s in samples) / sum(s.protected.wait_ns for s in samples)

    reports = []
    with collecting(ProtectSelectors.build(pids=[victim.pid])) as collector:
        # A second look only when the first misses on the tail: another session's burst on CPU 0
        # while the hog is stopped gives "alone" tick-long waits too (7 seen once in CI, against
        # 0-2 usually). A hog that caused no such waits, or a probe that missed them, fails both.
        for _attempt in range(2):
            # One compressing thread on each CPU: left alone, the load balancer sometimes parks both
            # on CPU 1 for seconds.
            workers = sorted(tid for tid in PROCFS.tids(hog.pid) if tid != hog.pid)  # the main thread only waits
            for worker, cpu in zip(workers, (0, 1)):
                os.sched_setaffinity(worker, {cpu})
            phases = {"alone": [], "contended": []}
            # Twelve alternations: tick-long waits are about one per thousand wakeups, and each
            # condition needs enough of them (and of the drift between seconds) to compare.
            for _ in range(12):
                for phase, sig in (("alone", signal.SIGSTOP), ("contended", signal.SIGCONT)):
                    os.kill(hog.pid, sig)
                    time.sleep(0.2)
                    collector.sample()
                    time.sleep(1.0)
                    phases[phase].append(collector.sample())
            pin(hog.pid, {1})
            time.sleep(0.3)
            pinned = observe(collector, 3.0)
            contended = phases["contended"]
            (p99_alone, p999_alone, long_alone), (p99_hog, p999_hog, long_hog) = tail(phases["alone"]), tail(contended)
            blamed = Counter()
            for sample in contended:
                blamed.update(dict(sample.blame))
            top_pid = blamed.most_common(1)[0][0]
            share = blame_share(contended, hog.pid)
            share_pinned = pinned.blame_share(hog.pid)
            reports.append(f"alone p99 {p99_alone:.0f} us p99.9 {p999_alone:.0f} us, {long_alone} waits >= 2 ms; contended p99 "
                           f"{p99_hog:.0f} us p99.9 {p999_hog:.0f} us, {long_hog} waits >= 2 ms; hog blame share {share:.2f} -> "
                           f"{share_pinned:.2f} pinned; top blame pid {top_pid} (hog {hog.pid})")
            if long_hog >= 5 and long_hog >= 2 * long_alone:
                break
    report = "; then ".join(reports)
    print(report)
    assert contended[-1].processes[hog.pid].comm == "fluent-bit"
    assert top_pid == hog.pid, report
    assert share > 0.5, report  # "most of the share"; the rest really ran there (kworkers, kdamond)
    assert long_hog >= 5 and long_hog >= 2 * long_alone, report
    assert share_pinned <= share / 4, report
    # the hog's two threads show up as one process using about two CPUs
    cpus = sum(s.usage_of(hog.pid).cpu_ns for s in contended) / sum(s.duration_ns for s in contended)
    peak = max(s.peak_cpus(s.usage_of(hog.pid)) for s in contended)
    assert cpus > 1.2 and peak > 1.2, f"{report}; hog cpu {cpus:.2f} peak {peak:.2f}"


def probe_and_schedstat(spawn, *victim_args: str, seconds: float = 3.0):
    """A victim on CPU 0 next to a one-thread hog pinned there: (probe's sample, kernel's run_delay ns)."""
    victim = spawn(victim_argv(0, *victim_args))
    hog = spawn(hog_argv("fluent-bit", 1))
    pin(hog.pid, {0})
    with collecting(ProtectSelectors.build(pids=[victim.pid])) as collector:
        collector.sample()
        before = run_delay_ns(victim.pid)
        time.sleep(seconds)
        sample = collector.sample()
        after = run_delay_ns(victim.pid)
    return sample, after - before


def test_probe_wait_total_agrees_with_schedstat_for_queueing(spawn, two_cpus):
    # A CPU-bound victim sharing CPU 0 with a CPU-bound hog: every wait is a preemption and
    # lasts a timeslice, which is exactly what the kernel's run_delay measures too.
    sample, kernel = probe_and_schedstat(spawn, "--sleep-us", "0", "--work-us", "1000000")
    probe = sample.protected.wait_ns
    print(f"probe {probe / 1e6:.1f} ms, schedstat {kernel / 1e6:.1f} ms, ratio {probe / kernel:.3f}, waits {sample.protected.waits}")
    assert kernel > 500e6, "the victim should have waited for about half of the time"
    assert abs(probe - kernel) <= 0.10 * kernel


def test_taskstats_wait_total_agrees_with_the_probe_and_schedstat_for_queueing(spawn, two_cpus):
    # The queueing scene again, with the fallback's netlink read taken in the same window.
    victim = spawn(victim_argv(0, "--sleep-us", "0", "--work-us", "1000000"))
    hog = spawn(hog_argv("fluent-bit", 1))
    pin(hog.pid, {0})
    taskstats = TaskstatsCounters(PROCFS)

    def netlink_delay_ns() -> int:
        return sum(taskstats.request(victim.pid, tid)[1] for tid in PROCFS.tids(victim.pid))

    try:
        with collecting(ProtectSelectors.build(pids=[victim.pid])) as collector:
            collector.sample()
            before = (netlink_delay_ns(), run_delay_ns(victim.pid))
            time.sleep(3.0)
            sample = collector.sample()
            after = (netlink_delay_ns(), run_delay_ns(victim.pid))
    finally:
        taskstats.close()
    netlink, kernel = after[0] - before[0], after[1] - before[1]
    probe = sample.protected.wait_ns
    print(f"probe {probe / 1e6:.1f} ms, taskstats {netlink / 1e6:.1f} ms, schedstat {kernel / 1e6:.1f} ms, "
          f"probe/taskstats {probe / netlink:.3f}")
    assert netlink > 500e6, "the victim should have waited for about half of the time"
    assert abs(probe - netlink) <= 0.10 * netlink
    assert abs(netlink - kernel) <= 0.02 * kernel  # the same counter (run_delay), read microseconds apart


def test_probe_wait_total_tracks_schedstat_for_wakeups(spawn, two_cpus):
    # The victim (sleep 1 ms, work 100 us) behind a hog on its CPU. The kernel skips the rq
    # clock update after a wakeup preemption (wakeup_preempt -> rq_clock_skip_update), so run_delay
    # leaves out the few microseconds from such a wakeup to the switch that the probe does count:
    # the two agree within 10% plus that bounded per-wakeup difference, and the probe never sees less.
    sample, kernel = probe_and_schedstat(spawn)
    probe = sample.protected.wait_ns
    wakeups = sample.protected.wakeups
    print(f"probe {probe / 1e6:.2f} ms, schedstat {kernel / 1e6:.2f} ms, wakeups {wakeups}, "
          f"difference per wakeup {(probe - kernel) / max(1, wakeups) / 1e3:.1f} us")
    assert wakeups > 1000
    assert probe >= 0.9 * kernel
    assert probe - kernel <= 0.10 * kernel + 20_000 * wakeups


def test_a_thread_created_after_watching_started_is_counted(spawn):
    victim = spawn(victim_argv(0, "--worker-after", "4"))  # after the probes load, even on a busy host
    with collecting(ProtectSelectors.build(pids=[victim.pid])) as collector:
        assert collector.protected[victim.pid] == {victim.pid}
        forks_before = collector.source.probes.snapshot().totals["protected_forks"]
        worker_tid = int(victim.read_line().split("tid=")[1])
        sample = observe(collector, 1.5)
        forks_after = collector.source.probes.snapshot().totals["protected_forks"]
        assert worker_tid in collector.source.kernel_protected_tids()
    # Only the new thread works, so every counted wait is its own.
    assert sample.protected.threads == 2
    assert sample.protected.waits > 500, sample.protected
    assert forks_after > forks_before, "the kernel should have added the thread on fork"


def test_a_process_started_later_is_protected_within_a_tick(spawn, tmp_path):
    # Exec through a symlink so the comm is the selector's from the first instruction.
    launcher = tmp_path / "svc-late"
    launcher.symlink_to(sys.executable)
    with collecting(ProtectSelectors.build(comms=["svc-late"])) as collector:
        collector.sample()
        late = spawn([str(launcher), str(WORKLOADS / "victim.py"), "--comm", "svc-late"])
        time.sleep(0.3)
        collector.sample()
        assert late.pid in collector.protected
        time.sleep(0.5)
        sample = collector.sample()
    assert sample.protected.waits > 100


def test_watch_json_cli_on_a_real_victim(spawn):
    victim = spawn(victim_argv(0))
    spawn(hog_argv("fluent-bit", 2))
    remediator = Path(sys.executable).with_name("remediator")
    out = subprocess.run(
        [str(remediator), "watch", "--pid", str(victim.pid), "--json", "-c", "2", "-i", "0.5"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 2
    for view in lines:
        assert view["source"] == "bpf"
        assert set(view) >= {"ts", "source", "protected", "top_cpu", "top_blame"}
        assert set(view["protected"]) >= {"threads", "wakeups", "wait_us_total", "p50_us", "p99_us", "p999_us", "max_us", "histogram"}
        assert view["protected"]["threads"] == 1 and view["protected"]["wakeups"] > 100
        assert set(view["top_cpu"][0]) >= {"pid", "comm", "cpu"}
        assert set(view["top_blame"][0]) >= {"pid", "comm", "blame_us", "share"}
    assert lines[-1]["top_cpu"][0]["comm"] == "fluent-bit"


@pytest.mark.root
def test_not_root_gets_one_line_not_a_traceback(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop privileges")
    remediator = Path(sys.executable).with_name("remediator")
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(remediator), "watch", "--pid", "1", "--source", "bpf", "-c", "1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["remediator: error: eBPF needs root (CAP_BPF and CAP_PERFMON): run with sudo"]
