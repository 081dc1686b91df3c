"""The changed-set read of proc_cpu (issue 14: read only what ran) against a full read of the map.

Processes keep running between the two reads, so equality is asked only where it must hold: an
entry that differs between the changed-set result and a later full read (or is missing from the
result) must have been marked changed again since, in the epoch now open.
"""

from __future__ import annotations

import struct
import time

import pytest

from remediator.probes import SchedProbes

from helpers.workloads import hog_argv, victim_argv

pytestmark = pytest.mark.bpf


def open_epoch_marks(probes: SchedProbes) -> set[tuple[int, int]]:
    keys, _values, _count = probes._maps["proc_changed"].items()
    parity = probes._epoch & 1
    return {(tgid, cpu) for tgid, cpu, p in struct.iter_unpack("<III", keys) if p == parity}


def test_the_changed_set_read_returns_what_a_full_read_would(spawn):
    spawn(victim_argv(0))
    spawn(hog_argv("fluent-bit", 2, "--burst-ms", "150", "--period-ms", "400"))
    probes = SchedProbes()
    try:
        probes.snapshot()  # the first read is a full one
        compared = 0
        incremental_reads = 0
        for _ in range(12):
            time.sleep(0.1)
            before = probes._full_read_at
            result = probes.snapshot().proc_cpu
            incremental_reads += probes._full_read_at == before
            full = probes._read_proc_cpu()
            marked = open_epoch_marks(probes)  # after the full read: covers every change since the snapshot
            for key, entry in full.items():
                if key in marked:
                    continue
                assert result.get(key) == entry, f"{key}: {result.get(key)} != {entry}"
                compared += 1
            assert set(result) <= set(full) | marked
        assert incremental_reads >= 11
        assert compared > 20  # most entries did not change between the two reads
    finally:
        probes.close()


def test_a_quiet_process_costs_no_read(spawn):
    """An entry of a process that did not run is not in the changed set, whatever the CPU count."""
    probes = SchedProbes()
    try:
        probes.snapshot()
        time.sleep(0.1)
        probes.snapshot()
        keys, _values, count = probes._maps["proc_changed"].items()
        total = len(probes._read_proc_cpu())
        # this host's idle processes: far fewer entries changed per 100 ms than exist
        assert count < total
    finally:
        probes.close()
