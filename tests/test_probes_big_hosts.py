"""The probes load for the possible-CPU counts of big hosts, not only this machine's.

The loader sizes per-CPU arrays and loops from the host's possible CPUs; the verifier judges
each program with those sizes. An exit handler that looped over every possible CPU loaded here
(2 CPUs) and was refused at 192 ("Argument list too long"): a big host would have had no probes.
"""

from __future__ import annotations

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
        time.sleep(0.1)
        snapshot = probes.snapshot()
        assert snapshot.totals["proc_map_full"] == 0
        assert any(entry.total_ns for entry in snapshot.proc_cpu.values())
    finally:
        probes.close()
