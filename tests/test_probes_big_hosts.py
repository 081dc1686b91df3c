"""The probes load for the possible-CPU counts of big hosts, not only this machine's.

The loader sizes per-CPU arrays and loops from the host's possible CPUs; the verifier judges
each program with those sizes. An exit handler that looped over every possible CPU loaded here
(2 CPUs) and was refused at 192 ("Argument list too long"): a big host would have had no probes.
"""

from __future__ import annotations

import os
import time

import pytest

from remediator.probes import ProbeSettings, SchedProbes

pytestmark = pytest.mark.bpf


@pytest.mark.parametrize("possible_cpus", [64, 192, 1024])
def test_the_probes_load_and_read_with_the_possible_cpus_of_a_big_host(possible_cpus):
    probes = SchedProbes(ProbeSettings(max_cpus=possible_cpus))
    try:
        assert len(probes._changed_queue) >= possible_cpus * 2 * probes.settings.changed_queue_slots * 8
        probes.snapshot()
        time.sleep(0.01)  # switched out and in: this run's start is the probes' to see (on an idle host, it may not have been since they loaded)
        spin_until = time.thread_time() + 0.02  # 20 ms on a CPU: past the report floor, so it is read
        while time.thread_time() < spin_until:
            pass
        time.sleep(0.05)  # switched out: the run is in its entry
        snapshot = probes.snapshot()
        assert snapshot.totals["proc_map_full"] == 0
        assert sum(entry.total_ns for (tgid, _cpu), entry in snapshot.proc_cpu.items() if tgid == os.getpid()) >= 20_000_000
    finally:
        probes.close()
