"""The arithmetic behind each tick: BPF snapshot differences and the procfs fallback."""

from __future__ import annotations

import dataclasses

import pytest

from remediator import histogram
from remediator.probes import CpuState, ProcCpuEntry, RawSnapshot, task_state_mask
from remediator.procfs import ProcFS
from remediator.sources import PROCFS_LIMITATIONS, ProcfsSource, bpf_delta
from remediator.taskstats import SCHEDSTAT, TASKSTATS, SchedstatCounters, open_thread_counters

from helpers.fakeproc import FakeProc, FakeProcess, FakeThread

W = 100_000_000  # window
TGIDS = {1001: 100, 1002: 100, 2001: 200}


def snap(mono_ns, *, totals=None, hist=None, max_ns=0, cpus=None, proc=(), blame=None):
    """blame: tgid -> ns, kept (as the probe keeps it) on the process's first entry."""
    entries = {}
    for tgid, cpu, total_ns, windows in proc:
        entries[(tgid, cpu)] = ProcCpuEntry(tgid, cpu, total_ns, tuple(windows), f"comm{tgid}")
    for tgid, ns in (blame or {}).items():
        key = next((key for key in entries if key[0] == tgid), (tgid, 0))
        entry = entries.get(key) or ProcCpuEntry(tgid, 0, 0, (), f"comm{tgid}")
        entries[key] = entry._replace(blame_ns=ns)
    return RawSnapshot(
        mono_ns=mono_ns,
        totals={"waits": 0, "wait_ns": 0, "wakeups": 0, "preemptions": 0, "blamed_ns": 0,
                "unattributed_ns": 0, "stale_starts": 0, **(totals or {})},
        histogram=hist or [0] * histogram.SLOTS,
        max_ns=max_ns,
        cpus=cpus or [CpuState(0, 0, 0), CpuState(0, 0, 0)],
        proc_cpu=entries,
    )


def delta(previous, current):
    return bpf_delta(previous, current, TGIDS.get, W)


def test_counters_are_differences_and_the_first_read_is_a_baseline():
    hist1 = [0] * histogram.SLOTS
    hist1[50] = 4
    hist2 = list(hist1)
    hist2[50] = 10
    hist2[90] = 1
    first = snap(10 * W, totals={"waits": 4, "wait_ns": 400, "stale_starts": 2}, hist=hist1)
    second = snap(20 * W, totals={"waits": 11, "wait_ns": 1500, "stale_starts": 3}, hist=hist2, max_ns=900)
    d = delta(first, second)
    assert (d.waits, d.wait_ns, d.max_ns) == (7, 1100, 900)
    assert d.histogram == {50: 6, 90: 1}
    assert d.lost == {"stale_starts": 1}
    assert (d.start_ns, d.end_ns) == (10 * W, 20 * W)


def test_cpu_time_sums_cpus_and_includes_the_run_in_progress():
    # Process 100 ran 50 ms on each CPU before; now +30 ms closed on cpu0, and thread 1002 has been
    # on cpu1 since 15.5 windows in, still running at 20 windows.
    first = snap(15 * W, proc=[(100, 0, 50_000_000, []), (100, 1, 50_000_000, [])])
    running = [CpuState(0, 0, 0), CpuState(int(15.5 * W), 0, 1002)]
    second = snap(20 * W, cpus=running, proc=[(100, 0, 80_000_000, [(16, 30_000_000)]), (100, 1, 50_000_000, [])])
    d = delta(first, second)
    cpu_ns, peak_ns = d.usage[100]
    assert cpu_ns == 30_000_000 + int(4.5 * W)
    # Window 16: 30 ms closed on cpu0 + the full window of the run in progress on cpu1.
    assert peak_ns == 30_000_000 + W


def test_peak_sees_a_burst_that_the_mean_hides():
    # 1 s tick; the process used two CPUs flat out for one window only.
    first = snap(10 * W, proc=[(200, 0, 0, []), (200, 1, 0, [])])
    second = snap(20 * W, proc=[(200, 0, W, [(14, W)]), (200, 1, W, [(14, W)])])
    cpu_ns, peak_ns = delta(first, second).usage[200]
    assert cpu_ns / (10 * W) == pytest.approx(0.2)
    assert peak_ns / W == pytest.approx(2.0)


def test_only_windows_closed_since_the_last_read_count():
    first = snap(10 * W, proc=[(200, 0, 0, [])])
    # Window 9 closed before the previous read; window 19 is still open at 19.5 windows.
    second = snap(int(19.5 * W), proc=[(200, 0, 3 * W, [(9, W), (12, W // 2), (19, W // 4)])])
    assert delta(first, second).usage[200][1] == W // 2


def test_the_previous_reads_totals_carry_over_instead_of_being_worked_out_again():
    first = snap(15 * W, proc=[(100, 0, 50_000_000, [])], cpus=[CpuState(14 * W, 0, 1001), CpuState(0, 0, 0)])
    second = snap(20 * W, proc=[(100, 0, 90_000_000, [])])
    carried = delta(None, first).cumulative_usage
    assert carried == {100: 50_000_000 + W}  # the run in progress included
    assert bpf_delta(first, second, TGIDS.get, W, carried).usage == delta(first, second).usage


def test_a_recreated_entry_counts_from_zero_not_negative():
    first = snap(10 * W, proc=[(200, 0, 500_000_000, [])], blame={200: 9_000})
    second = snap(20 * W, proc=[(200, 0, 20_000_000, [])], blame={200: 1_000})
    d = delta(first, second)
    assert d.usage[200][0] == 20_000_000
    assert d.blame[200] == 1_000


def with_changes(previous: RawSnapshot, current: RawSnapshot) -> RawSnapshot:
    """`current` as the probes give it: the changed keys' previous entries and the per-process index."""
    changed = {key: previous.proc_cpu.get(key) for key, entry in current.proc_cpu.items()
               if previous.proc_cpu.get(key) != entry}
    cpus_of: dict[int, set[int]] = {}
    for tgid, cpu in current.proc_cpu:
        cpus_of.setdefault(tgid, set()).add(cpu)
    return dataclasses.replace(current, proc_cpu_changed=changed, cpus_of=cpus_of)


def test_the_delta_from_the_changed_entries_equals_the_delta_from_the_whole_table():
    """What the tick reads at 1,000 processes (bench/scale.py): only what changed, the same figures."""
    first = snap(15 * W, cpus=[CpuState(0, 0, 0), CpuState(int(14.5 * W), 0, 3001)],
                 proc=[(100, 0, 50_000_000, [(14, 10_000_000)]), (100, 1, 20_000_000, [(15, 5_000_000)]),
                       (200, 0, 70_000_000, [(12, 1_000_000)]), (500, 1, 900_000_000, [(13, W)])])
    # 100 ran again on cpu0 (its cpu1 entry, unchanged, still holds 5 ms of window 15); 200 did not
    # run; 300 has been running on cpu1 since before the first read; 400 is new; 500 was recreated.
    second = snap(20 * W, cpus=[CpuState(20 * W - 10_000_000, 0, 1001), CpuState(int(14.5 * W), 0, 3001)],
                  proc=[(100, 0, 90_000_000, [(14, 10_000_000), (15, 30_000_000), (16, 10_000_000)]),
                        (100, 1, 20_000_000, [(15, 5_000_000)]), (200, 0, 70_000_000, [(12, 1_000_000)]),
                        (400, 0, 7_000_000, [(18, 7_000_000)]), (500, 1, 3_000_000, [(17, 3_000_000)])])
    tgids = {**TGIDS, 3001: 300}
    carried = bpf_delta(None, first, tgids.get, W).cumulative_usage
    whole = bpf_delta(first, second, tgids.get, W, carried)
    changed = bpf_delta(first, with_changes(first, second), tgids.get, W, carried)
    assert set(whole.usage) == {100, 300, 400, 500}
    assert changed.usage == whole.usage
    assert whole.usage[100] == (50_000_000, 35_000_000)  # window 15 adds up both CPUs
    assert {tgid: changed.comms.get(tgid) for tgid in changed.usage} == {tgid: whole.comms.get(tgid) for tgid in whole.usage}
    assert changed.live_tgids == whole.live_tgids


def test_a_run_counted_in_progress_counts_once_when_its_entry_is_read_ticks_later():
    """Below the report floor an entry is read only ticks after a run ends: the part counted
    while the run was in progress is taken off then, not at the next read, so it counts once."""
    start, ended = int(9.5 * W), int(12.5 * W)
    a = snap(10 * W, cpus=[CpuState(0, 0, 0), CpuState(start, 0, 1002)], proc=[(100, 1, 50_000_000, [])])
    b = snap(15 * W, proc=[(100, 1, 50_000_000, [])])  # the run ended at 12.5; its entry not queued
    c = snap(20 * W, proc=[(100, 1, 50_000_000 + ended - start, [])])  # read now
    first = bpf_delta(None, a, TGIDS.get, W)
    second = bpf_delta(a, with_changes(a, b), TGIDS.get, W, first.cumulative_usage, first.credits)
    third = bpf_delta(b, with_changes(b, c), TGIDS.get, W, second.cumulative_usage, second.credits)
    assert 100 not in second.usage
    assert third.usage[100][0] == ended - 10 * W  # the run's time after the first read, once


def test_blame_comes_from_the_changed_entries_summed_over_cpus():
    a = snap(10 * W, proc=[(200, 0, 10, []), (200, 1, 10, [])], blame={200: 5_000})
    b = snap(20 * W, proc=[(200, 0, 10, []), (200, 1, 10, [])])
    b = dataclasses.replace(b, proc_cpu={**b.proc_cpu, (200, 0): b.proc_cpu[(200, 0)]._replace(blame_ns=7_000),
                                         (200, 1): b.proc_cpu[(200, 1)]._replace(blame_ns=4_000)})
    d = bpf_delta(a, with_changes(a, b), TGIDS.get, W)
    assert d.blame == {200: 2_000 + 4_000}
    assert d.blame == bpf_delta(a, b, TGIDS.get, W).blame  # the same from the whole table


def test_busy_time_per_cpu_includes_the_run_in_progress():
    first = snap(10 * W, cpus=[CpuState(9 * W, 100, 1001), CpuState(0, 0, 0)])
    second = snap(20 * W, cpus=[CpuState(19 * W, 100 + 10 * W, 1001), CpuState(0, 0, 0)])
    d = delta(first, second)
    # cpu0: previously 100 + 1 window in progress; now 100 + 10 windows closed + 1 in progress.
    assert d.cpu_busy_ns == [10 * W, 0]


def test_task_state_mask_from_the_tracepoint_format():
    modern = ('print fmt: "prev_comm=%s ...", REC->prev_comm, REC->prev_pid, REC->prev_prio, (REC->prev_state & '
              "((((0x00000000 | 0x00000001 | 0x00000002 | 0x00000004 | 0x00000008 | 0x00000010 | 0x00000020 | "
              '0x00000040) + 1) << 1) - 1)) ? __print_flags(...)')
    assert task_state_mask(modern) == 0xFF
    assert task_state_mask('print fmt: "...", REC->prev_state & (4096-1) ? ...') == 4095
    assert task_state_mask("unrecognised") == 0xFF


# -- the procfs fallback on a fake tree -----------------------------------------------------------


def fallback_tree(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(10, "api", threads=[FakeThread(10, wait_ns=1_000_000, timeslices=100), FakeThread(11, wait_ns=0, timeslices=0)]))
    proc.add(FakeProcess(20, "fluent-bit", utime=100, stime=0))
    proc.psi_some_total_us = 5_000
    proc.write()
    return proc


def test_fallback_reads_schedstat_stat_and_psi(tmp_path):
    proc = fallback_tree(tmp_path)
    clock = iter([1_000_000_000, 2_000_000_000, 3_000_000_000]).__next__
    source = ProcfsSource(ProcFS(proc.root), psi_path=proc.root / "pressure/cpu", clock=clock)
    protected = {10: {10, 11}}
    baseline = source.read(protected)
    assert baseline.wait_ns == 0 and baseline.usage == {}

    proc.processes[10].threads[0].wait_ns = 4_000_000
    proc.processes[10].threads[0].timeslices = 130
    proc.processes[10].threads[1].wait_ns = 500_000
    proc.processes[10].threads[1].timeslices = 10
    proc.processes[20].utime = 250  # +150 ticks = 1.5 s of CPU
    proc.psi_some_total_us = 85_000
    proc.cpu_ticks[0][0] = 100  # cpu0 busy 100 ticks
    proc.write()
    d = source.read(protected)
    assert d.wait_ns == 3_000_000 + 500_000
    assert d.waits == 40
    assert d.usage[20][0] == 150 * source.tick_ns
    assert d.usage[20][1] is None  # no sub-interval peaks
    assert d.psi_some_us == 80_000
    assert d.histogram is None and d.max_ns is None and d.blame == {}
    assert d.cpu_busy_ns[0] == 100 * source.tick_ns


def test_fallback_counts_a_thread_born_between_reads_from_zero(tmp_path):
    proc = fallback_tree(tmp_path)
    source = fallback_source(proc)
    source.read({10: {10, 11}})
    proc.processes[10].threads.append(FakeThread(12, wait_ns=700_000, timeslices=7))
    proc.write()
    d = source.read({10: {10, 11, 12}})
    assert d.wait_ns == 700_000 and d.waits == 7


def test_fallback_says_what_it_cannot_show():
    text = " ".join(PROCFS_LIMITATIONS)
    assert "no run-queue latency tail" in text and "no blame" in text


class ExitingCounters(SchedstatCounters):
    """schedstat reads plus exit records handed in by the test, as taskstats delivers them."""

    name = TASKSTATS

    def __init__(self, procfs):
        super().__init__(procfs)
        self.records: dict[int, tuple[int, int, int]] = {}

    def exited(self):
        records, self.records = self.records, {}
        return records


def fallback_source(proc, counters=None) -> ProcfsSource:
    """The fallback on a fake tree, its clock 0.1 s a read."""
    return ProcfsSource(ProcFS(proc.root), psi_path=proc.root / "pressure/cpu", clock=iter(range(1, 10**9, 10**8)).__next__,
                        counters=counters)


def test_fallback_counts_the_last_wait_of_a_thread_that_exited_between_reads(tmp_path):
    proc = fallback_tree(tmp_path)
    counters = ExitingCounters(ProcFS(proc.root))
    source = fallback_source(proc, counters)
    source.read({10: {10, 11}})
    # Thread 11 waits 2 ms more and exits; the collector no longer lists it, its exit record tells.
    proc.processes[10].threads.pop()
    proc.write()
    counters.records = {11: (0, 2_000_000, 5), 99: (0, 7_000_000, 9)}  # 99: some other task of the host
    d = source.read({10: {10}})
    assert d.wait_ns == 2_000_000 and d.waits == 5
    assert "taskstats" in source.limitations[0]


def test_schedstat_alone_loses_the_wait_of_a_thread_that_exited_between_reads(tmp_path):
    proc = fallback_tree(tmp_path)
    source = fallback_source(proc)
    source.read({10: {10, 11}})
    proc.processes[10].threads.pop()
    proc.write()
    d = source.read({10: {10}})
    assert d.wait_ns == 0
    assert "schedstat" in source.limitations[0] and "loses its last wait" in source.limitations[0]


def test_a_thread_listed_but_gone_by_the_read_is_counted_from_its_exit_record(tmp_path):
    proc = fallback_tree(tmp_path)
    counters = ExitingCounters(ProcFS(proc.root))
    source = fallback_source(proc, counters)
    source.read({10: {10, 11}})
    proc.processes[10].threads.pop()
    proc.write()
    counters.records = {11: (0, 1_500_000, 3)}
    d = source.read({10: {10, 11}})  # the collector listed 11 just before it exited
    assert d.wait_ns == 1_500_000 and d.waits == 3


def test_a_fake_tree_uses_schedstat_and_says_why(tmp_path):
    proc = fallback_tree(tmp_path)
    counters, why = open_thread_counters(ProcFS(proc.root))
    assert counters.name == SCHEDSTAT and "other than /proc" in why


def test_every_lost_counter_is_a_probe_counter():
    """The kernel counts forks the full protected map could not take (protected_map_full): a
    renamed field once made that count vanish from every sample."""
    from remediator.probes import WAIT_TOTAL_FIELDS
    from remediator.sources import LOST_COUNTERS

    assert set(LOST_COUNTERS) <= set(WAIT_TOTAL_FIELDS)
    first = snap(10 * W, totals={"protected_map_full": 1})
    second = snap(20 * W, totals={"protected_map_full": 4})
    assert delta(first, second).lost == {"protected_map_full": 3}


def kernel_slots(windows: dict[int, int], count: int = 16) -> list[int]:
    """A proc_cpu window ring as the kernel writes it: slot w % count holds (w & 0xffffffff) << 32 | ns."""
    slots = [0] * count
    for window, ns in windows.items():
        slots[window % count] = ((window & 0xFFFFFFFF) << 32) | ns
    return slots


def test_only_the_windows_since_the_previous_read_are_decoded():
    from remediator.probes import windows_since

    slots = kernel_slots({100: 1, 101: 2, 110: 3, 111: 4, 112: 5})
    assert windows_since(slots, 110, 112) == ((110, 3), (111, 4), (112, 5))
    assert windows_since(slots, 0, 112) == ((100, 1), (101, 2), (110, 3), (111, 4), (112, 5))
    assert windows_since(slots, 0, 116) == ((101, 2), (110, 3), (111, 4), (112, 5))  # 100 shares its slot with 116: a lap back
    # A slot still holding a window from a lap ago is not the window asked for.
    assert windows_since(kernel_slots({97: 9}), 113, 113) == ()


def test_windows_picked_once_per_read_decode_a_value_as_its_own_ring_would():
    # The read unpacks a whole value (total_ns, blame_ns, the slots, comm, ...) and picks the
    # windows at their positions in it: the same windows as the ring decoded on its own.
    from remediator.probes import window_picks, windows_at, windows_since

    slots = kernel_slots({100: 1, 101: 2, 110: 3, 111: 4, 112: 5})
    value = (7, 8, *slots, b"comm", 0, 0)
    for since, now in ((110, 112), (0, 112), (0, 116), (113, 113)):
        assert windows_at(value, window_picks(len(slots), since, now, first_slot=2)) == windows_since(slots, since, now)


def test_comm_texts_are_kept_by_their_bytes_and_bounded():
    import types

    from remediator.probes import COMM_TEXTS_MAX, SchedProbes

    holder = types.SimpleNamespace(_comm_texts={})
    assert SchedProbes._comm(holder, b"vector\0\0\0\0\0\0\0\0\0\0") == "vector"
    assert SchedProbes._comm(holder, b"caf\xc3\xa9\0junk\0\0\0\0\0\0\0") == "caf\u00e9"
    for index in range(COMM_TEXTS_MAX + 10):
        assert SchedProbes._comm(holder, f"w{index}".encode().ljust(16, b"\0")) == f"w{index}"
    assert len(holder._comm_texts) <= COMM_TEXTS_MAX


def test_a_burst_just_after_the_32_bit_window_index_wraps_is_seen():
    # ~2^32 windows after boot (104 days of 2 ms windows, 18 years of 134 ms ones): the probe's
    # window indices wrapped, user space's did not. Decoded, the peak is the burst's.
    from remediator.probes import windows_since

    base = (1 << 32) - 2
    now_window = base + 4
    slots = kernel_slots({base + 1: W // 10, base + 2: W, base + 3: W // 2})
    assert [low >> 32 for low in slots if low] == [0, 1, 0xFFFFFFFF]  # as the kernel keeps them
    windows = windows_since(slots, base, now_window)
    assert windows == ((base + 1, W // 10), (base + 2, W), (base + 3, W // 2))
    first = snap(base * W, proc=[(100, 0, 0, [])])
    second = snap(now_window * W, proc=[(100, 0, W // 10 + W + W // 2, windows)])
    cpu_ns, peak_ns = delta(first, second).usage[100]
    assert peak_ns == W


def test_proc_cpu_map_is_sized_from_the_host():
    from remediator.probes import PROC_CPU_ENTRIES_MAX, PROC_CPU_ENTRIES_MIN, ProbeSettings, proc_cpu_entries_for

    assert proc_cpu_entries_for(2) == PROC_CPU_ENTRIES_MIN
    assert proc_cpu_entries_for(192) >= 192 * 200  # ~200 long-lived processes on every CPU of a big host
    assert proc_cpu_entries_for(100_000) == PROC_CPU_ENTRIES_MAX
    assert "-DMAX_PROC_CPU_ENTRIES=49152" in ProbeSettings(max_cpus=192).cflags(0xFF)
    assert "-DMAX_PROC_CPU_ENTRIES=1000" in ProbeSettings(max_cpus=192, max_proc_cpu_entries=1000).cflags(0xFF)


def test_psi_reader_keeps_one_descriptor_and_reopens_after_a_failed_read(tmp_path):
    from remediator.sources import PsiReader

    path = tmp_path / "cpu"
    path.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=100\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")
    reader = PsiReader(path)
    assert reader.read() == 100
    descriptor = reader._file.fd
    path.write_text("some avg10=1.00 avg60=0.00 avg300=0.00 total=2500\n")  # rewritten in place, as the kernel does
    assert reader.read() == 2500 and reader._file.fd == descriptor
    reader.close()
    path.unlink()
    assert reader.read() is None and reader._file.fd is None  # no PSI (an old kernel): nothing, no error
    path.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=3000\n")
    assert reader.read() == 3000
    path.write_text("some avg10=0.00 total=oops\n")
    assert reader.read() is None
    reader.close()


def test_the_daemons_probes_read_an_entry_past_a_floor_that_follows_its_tick():
    from remediator.probes import probe_settings_for, report_floor_for

    assert report_floor_for(0.25) == 3_906_250  # 1/64 of the tick: 1.6% of a CPU per tick
    assert report_floor_for(0.01) == 1_000_000 and report_floor_for(60) == 4_000_000  # within 1 to 4 ms
    settings = probe_settings_for(0.25)
    assert settings.report_floor_ns == 3_906_250 and settings.window_ns == 1 << 26  # 67 ms: 4 windows a tick
    assert "-DREPORT_FLOOR_NS=3906250ull" in settings.cflags(0xFF)
