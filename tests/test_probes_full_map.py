"""A full protected-thread map (a tiny one, -DMAX_PROTECTED_THREADS=4) is counted, never fatal:
user space gets back the threads it could not add, the kernel counts the forks it could not add."""

from __future__ import annotations

import sys
import time

import pytest

from remediator.probes import ProbeSettings, SchedProbes

pytestmark = pytest.mark.bpf

THREADS_LATER = [sys.executable, "-c", (
    "import threading, time\n"
    "print('ready', flush=True)\n"
    "time.sleep(1.0)\n"
    "for _ in range(6):\n"
    "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    "time.sleep(600)\n"
)]


def test_a_full_protected_map_refuses_threads_and_counts_forks(spawn):
    probes = SchedProbes(ProbeSettings(max_protected_threads=4))
    try:
        worker = spawn(THREADS_LATER)
        # Full: the worker's main thread plus three made-up tids; two more are refused, not raised.
        refused = probes.protect([worker.pid, 4_000_001, 4_000_002, 4_000_003, 4_000_004, 4_000_005])
        assert refused == {4_000_004, 4_000_005} and probes.protect_failures == 2
        assert probes.protected_tids() == {worker.pid, 4_000_001, 4_000_002, 4_000_003}
        # The worker now starts six threads: the fork tracepoint cannot add them, and counts each.
        deadline = time.monotonic() + 20
        while probes.snapshot().totals["protected_map_full"] < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert probes.snapshot().totals["protected_map_full"] == 6
    finally:
        probes.close()


def test_a_full_burst_candidate_map_says_how_many_it_left_out():
    from remediator.probes import BurstCandidate

    probes = SchedProbes(ProbeSettings(max_burst_candidates=4))
    try:
        wanted = {4_100_000 + i: BurstCandidate(threshold_ns=2_000_000, count=2, span_ns=50_000_000) for i in range(6)}
        assert probes.set_burst_candidates(wanted) == 2
        assert set(probes.burst_candidates()) == set(list(wanted)[:4])
        assert probes.set_burst_candidates(dict(list(wanted.items())[2:])) == 0  # two freed: the rest fit
        assert set(probes.burst_candidates()) == set(list(wanted)[2:])
    finally:
        probes.close()
