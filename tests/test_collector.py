"""The collector keeps the protected set current: exec events, new threads, exits, in-kernel forks."""

from __future__ import annotations

from remediator.collector import Collector
from remediator.probes import ExecEvent
from remediator.procfs import ProcFS
from remediator.selectors import ProtectSelectors
from remediator.sources import TickDelta

from helpers.fakeproc import FakeProc, FakeProcess, FakeThread
from helpers.sources import Clock, RecordingSource


def setup(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(10, "api", threads=[FakeThread(10), FakeThread(11)]))
    proc.add(FakeProcess(20, "fluent-bit"))
    proc.write()
    source = RecordingSource()
    clock = Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["api"]), ProcFS(proc.root), rescan_s=5.0,
                          mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    return proc, source, clock, collector


def test_start_protects_every_thread_of_matching_processes(tmp_path):
    _, source, _, collector = setup(tmp_path)
    assert source.kernel_tids == {10, 11}
    assert collector.protected == {10: {10, 11}}


def test_a_new_matching_process_is_picked_up_from_its_exec_event_within_a_tick(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    proc.add(FakeProcess(30, "api", threads=[FakeThread(30), FakeThread(31)]))
    proc.write()
    source.pending_execs.append(ExecEvent(0, 30, 30, "/usr/bin/api"))
    clock.now += 0.25  # well before the next rescan
    sample = collector.sample()
    assert 30 in sample.protected.pids and {30, 31} <= source.kernel_tids
    assert sample.protected.threads == 4


def test_a_thread_the_kernel_missed_is_added_and_a_gone_process_dropped(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    proc.processes[10].threads.append(FakeThread(12))
    proc.write()
    collector.sample()
    assert 12 in source.kernel_tids
    proc.remove(10)
    sample = collector.sample()
    assert sample.protected.pids == () and collector.protected == {}


def test_a_protected_pid_taken_by_another_process_is_dropped_not_its_threads_protected(tmp_path):
    """The protected process exits and another takes its pid before the next tick (a user racing
    pids): the thread count differs, and the newcomer's threads must not be protected on the
    strength of the pid alone (it would be exempt from every policy, and its waits would steer blame)."""
    proc, source, clock, collector = setup(tmp_path)
    assert collector.protected == {10: {10, 11}}
    proc.remove(10)
    proc.add(FakeProcess(10, "worker", start_time=5000, threads=[FakeThread(10), FakeThread(12), FakeThread(13)]))
    proc.write()
    source.kernel_tids -= {10, 11}  # the kernel forgot the exited threads
    clock.now += 0.25  # before the next rescan

    sample = collector.sample()

    assert collector.protected == {} and sample.protected.pids == ()
    assert not source.kernel_tids & {10, 12, 13}


def test_children_added_in_the_kernel_are_adopted_at_rescan(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    proc.add(FakeProcess(40, "sh", ppid=10))  # forked by api: the kernel protected it on fork
    proc.write()
    source.kernel_tids.add(40)
    clock.now += 6
    sample = collector.sample()
    assert 40 in sample.protected.pids
    assert collector.protected_reason[40] == "child of a protected process"


def test_a_process_no_longer_matching_is_released_at_rescan(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    proc.processes[10].comm = "renamed"
    proc.write()
    clock.now += 6
    collector.sample()
    assert collector.protected == {} and not ({10, 11} & source.kernel_tids)


def test_dead_processes_are_dropped_from_the_maps_at_rescan(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    source.next_delta = TickDelta(0, 1_000_000_000, usage={20: (5, 0), 99: (7, 0)}, live_tgids={20, 99})
    clock.now += 6
    collector.sample()
    assert source.forgotten == set()  # not before one more read: its last time may be queued still
    source.next_delta = TickDelta(1_000_000_000, 2_000_000_000, live_tgids={20})
    clock.now += 0.25
    collector.sample()
    assert source.forgotten == {99}


def test_sample_carries_metadata_for_busy_and_blamed_processes(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    source.next_delta = TickDelta(0, 1_000_000_000, usage={20: (900_000_000, 100_000_000), 10: (1_000, 0)},
                                  blame={20: 5_000}, wait_ns=6_000)
    sample = collector.sample()
    assert sample.usage[0].pid == 20 and sample.usage[0].comm == "fluent-bit"
    assert sample.processes[20].comm == "fluent-bit" and 10 in sample.processes
    assert sample.usage_of(10).protected and not sample.usage_of(20).protected


def test_a_figure_within_the_sources_step_costs_no_lookup(tmp_path):
    """With a report floor (the BPF source: 1 ms), a process that barely runs shows up now and then
    with about a floor's worth: looked up, a /proc read per process per tick on a host of many small
    processes. Within twice the floor it is not, unless its blame is a real part of the wait."""
    proc, source, clock, collector = setup(tmp_path)
    for pid, comm in ((30, "tiny"), (40, "busy"), (50, "culprit"), (60, "crumb")):
        proc.add(FakeProcess(pid, comm))
    proc.write()
    source.report_floor_ns = 1_000_000
    source.next_delta = TickDelta(0, 250_000_000, usage={30: (1_500_000, 0), 40: (30_000_000, 0)},
                                  blame={50: 1_500_000, 60: 100_000}, wait_ns=10_000_000)
    sample = collector.sample()
    assert 40 in sample.processes and 50 in sample.processes  # busy; 15% of the wait
    assert 30 not in sample.processes and 60 not in sample.processes  # a floor's lump; 1% of the wait
    assert sample.usage_of(30).cpu_ns == 1_500_000  # its figure is still in the sample


def test_an_exec_refreshes_what_the_sample_says_about_a_process(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    source.next_delta = TickDelta(0, 1_000_000_000, usage={20: (900_000_000, 100_000_000)})
    assert collector.sample().processes[20].comm == "fluent-bit"
    proc.processes[20].comm = "gzip"  # same pid, same start time: an exec
    proc.write()
    source.pending_execs.append(ExecEvent(0, 20, 20, "/bin/gzip"))
    assert collector.sample().processes[20].comm == "gzip"


def test_a_process_that_renames_itself_after_exec_is_seen_under_its_new_name(tmp_path):
    """A Python program (or a JVM) names itself with prctl after exec: first seen as 'python3',
    it must be matched as 'fluent-bit' once it is (regression: the cached name stayed forever, and
    a shipper started after the daemon was never acted on; found in the guest VMs)."""
    proc, source, clock, collector = setup(tmp_path)
    proc.processes[20].comm = "python3"
    proc.write()
    busy = TickDelta(0, 1_000_000_000, usage={20: (900_000_000, 100_000_000)}, blame={20: 5_000}, wait_ns=6_000)
    source.next_delta = busy
    assert collector.sample().processes[20].comm == "python3"
    proc.processes[20].comm = "fluent-bit"
    proc.write()
    clock.now += 6
    source.next_delta = busy
    sample = collector.sample()
    assert sample.processes[20].comm == "fluent-bit" and sample.usage[0].comm == "fluent-bit"


class FullMapSource(RecordingSource):
    """The protected map holds `capacity` threads; protect() returns those it refused."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def protect(self, tids):
        refused = set()
        for tid in sorted(tids):
            if tid in self.kernel_tids or len(self.kernel_tids) < self.capacity:
                self.kernel_tids.add(tid)
            else:
                refused.add(tid)
        return refused


def test_a_full_protected_map_is_counted_and_retried_not_fatal(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(10, "api", threads=[FakeThread(10), FakeThread(11), FakeThread(12)]))
    proc.write()
    source = FullMapSource(capacity=2)
    clock = Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["api"]), ProcFS(proc.root), mono_clock=clock)
    collector.start()
    assert collector.untracked_threads() == 1 and source.kernel_tids == {10, 11}
    sample = collector.sample()  # the loop goes on, and the refused thread is tried again
    assert sample.protected.pids == (10,) and collector.untracked_threads() == 1
    source.capacity = 3  # room again (another thread left the map)
    collector.sample()
    assert collector.untracked_threads() == 0 and source.kernel_tids == {10, 11, 12}


def test_the_sample_names_each_processs_scheduling_group_and_sees_it_change(tmp_path):
    from remediator.schedgroups import SchedGroups

    proc = FakeProc(tmp_path / "proc")
    proc.autogroup_enabled = 1
    proc.add(FakeProcess(10, "api", autogroup="/autogroup-4 nice 0"))
    proc.add(FakeProcess(20, "fluent-bit", utime=5, autogroup="/autogroup-9 nice 0"))
    proc.write()
    source = RecordingSource()
    source.next_delta = TickDelta(0, 1_000_000_000, usage={20: (900_000_000, None)})
    clock = Clock()
    procfs = ProcFS(proc.root)
    collector = Collector(source, ProtectSelectors.build(comms=["api"]), procfs, mono_clock=clock,
                          sched_groups=SchedGroups(procfs, None))
    collector.start()
    sample = collector.sample()
    assert sample.processes[10].sched_group == "autogroup-4" and sample.processes[20].sched_group == "autogroup-9"
    proc.processes[20].autogroup = "/autogroup-4 nice 0"  # it joined the service's session (setsid elsewhere is alike)
    proc.write()
    clock.now += 6.0  # past the re-check interval of a known process
    assert collector.sample().processes[20].sched_group == "autogroup-4"


class CountingProcFS(ProcFS):
    """Counts the reads the collector's caches are there to spare."""

    def __init__(self, root):
        super().__init__(root)
        self.info_reads: list[int] = []
        self.task_listings: list[int] = []
        self.thread_counts: list[int] = []

    def process_info_and_cgroups(self, pid, known_ancestors=None):
        self.info_reads.append(pid)
        return super().process_info_and_cgroups(pid, known_ancestors)

    def tids(self, pid):
        self.task_listings.append(pid)
        return super().tids(pid)

    def thread_count(self, pid):
        self.thread_counts.append(pid)
        return super().thread_count(pid)


def test_a_busy_process_seen_before_is_not_read_again_when_it_returns_to_the_top(tmp_path):
    """On a busy host the top N change every tick: metadata read once is kept for later ticks
    (regression: the cache held only the current tick's processes, ~20 process reads a tick at
    1,000 processes in bench/scale.py)."""
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(10, "api", threads=[FakeThread(10)]))
    workers = list(range(100, 110))
    for pid in workers:
        proc.add(FakeProcess(pid, "worker"))
    proc.write()
    procfs = CountingProcFS(proc.root)
    source, clock = RecordingSource(), Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["api"]), procfs, rescan_s=5.0, top_n=1, mono_clock=clock)
    collector.start()
    for pid in workers + workers:  # each worker the busiest once, then again
        source.next_delta = TickDelta(0, 250_000_000, usage={pid: (200_000_000, 0)})
        clock.now += 0.25
        assert pid in collector.sample().processes
    assert sorted(pid for pid in procfs.info_reads if pid in workers) == workers


def test_the_task_directory_is_listed_only_when_the_thread_count_changes(tmp_path):
    proc, source, clock, collector = setup(tmp_path)
    procfs = CountingProcFS(proc.root)
    collector.procfs = procfs
    for _ in range(3):
        clock.now += 0.25
        collector.sample()
    assert procfs.task_listings == []
    proc.processes[10].threads.append(FakeThread(12))
    proc.write()
    clock.now += 0.25
    assert collector.sample().protected.threads == 3
    assert procfs.task_listings == [10] and 12 in source.kernel_tids



def test_thread_counts_are_read_only_after_the_kernel_added_or_removed_a_protected_thread(tmp_path):
    """With a kernel count of protected threads added and removed (the BPF source), a tick reads
    no thread count while it stays; after it moves, the counts are read at two ticks (a thread that
    exits leaves its task directory a little after the kernel counts it), and a process gone is
    dropped."""
    proc, source, clock, collector = setup(tmp_path)
    procfs = CountingProcFS(proc.root)
    collector.procfs = procfs
    source.kernel_changes = 7
    for _ in range(4):
        clock.now += 0.25
        collector.sample()
    assert procfs.thread_counts == [10, 10]  # the first two ticks: nothing seen before them
    procfs.thread_counts.clear()
    proc.processes[10].threads.append(FakeThread(12))  # forked: the kernel protected it and counted it
    proc.write()
    clock.now += 0.25
    assert collector.sample().protected.threads == 2 and procfs.thread_counts == []  # the count moves at the read
    source.kernel_changes = 8
    for _ in range(3):
        clock.now += 0.25
        threads = collector.sample().protected.threads
    assert threads == 3 and procfs.thread_counts == [10, 10]
    procfs.thread_counts.clear()
    proc.remove(10)  # the service exits: its threads' exits are counted
    source.kernel_changes = 11
    clock.now += 0.25
    collector.sample()
    assert collector.protected == {} and procfs.thread_counts == [10]


def test_a_rescan_judges_the_protected_processes_by_what_the_selectors_need_only(tmp_path):
    """Every rescan judges each protected process again (it may have been renamed, moved or have
    changed user): from its stat, cgroup and status, not a whole reading with its exe, cmdline and
    ancestors (a pre-forking service protected as 50 processes read 50 of those every 5 s, beside
    the sample's own kept readings)."""
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    for pid in range(10, 60):
        proc.add(FakeProcess(pid, "api", ppid=1))
    proc.write()
    whole: list[int] = []

    class WholeReadingProcFS(ProcFS):
        def cmdline(self, pid):
            whole.append(pid)
            return super().cmdline(pid)

    source, clock = RecordingSource(), Clock()
    collector = Collector(source, ProtectSelectors.build(comms=["api"], users=[0]), WholeReadingProcFS(proc.root),
                          rescan_s=5.0, mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    assert len(collector.protected) == 50 and whole == []
    clock.now += 0.25
    collector.sample()  # the sample reads each protected process in full once (and keeps the reading)
    whole.clear()
    proc.processes[12].uid = 1000  # changed user: refused at the next rescan
    proc.write()
    clock.now += 6
    collector.sample()
    assert len(collector.protected) == 49 and 12 not in collector.protected and whole == []


def test_a_rescan_lists_a_protected_processs_threads_only_every_full_rescan(tmp_path):
    from remediator.collector import FULL_RESCAN_S

    proc, source, clock, collector = setup(tmp_path)
    procfs = CountingProcFS(proc.root)
    collector.procfs = procfs
    # One thread exits and another starts between two ticks: the count is unchanged. The kernel
    # protected the new one on fork; the collector's own list catches up at the full rescan.
    proc.processes[10].threads = [FakeThread(10), FakeThread(12)]
    proc.write()
    source.kernel_tids.add(12)
    clock.now += 6
    collector.sample()
    assert procfs.task_listings == [] and collector.protected == {10: {10, 11}}
    clock.now += FULL_RESCAN_S
    collector.sample()
    assert procfs.task_listings == [10] and collector.protected == {10: {10, 12}}


class ListingProcFS(ProcFS):
    def __init__(self, root):
        super().__init__(root)
        self.listings = 0

    def pids(self):
        self.listings += 1
        return super().pids()


def test_the_dead_process_check_reuses_the_rescans_listing_and_confirms_what_it_misses(tmp_path):
    from remediator.collector import Collector as _Collector

    proc = FakeProc(tmp_path / "proc")
    for process in (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "fluent-bit")):
        proc.add(process)
    proc.write()
    procfs = ListingProcFS(proc.root)

    class StartingBetweenSource(RecordingSource):
        """Process 50 starts after the rescan listed /proc and before the read that sees it."""

        def read(self, protected):
            if 50 not in proc.processes:
                proc.add(FakeProcess(50, "cron"))
                proc.write()
            return super().read(protected)

    source, clock = StartingBetweenSource(), Clock()
    collector = _Collector(source, ProtectSelectors.build(comms=["api"]), procfs, rescan_s=5.0, mono_clock=clock,
                           wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    source.next_delta = TickDelta(0, 1_000_000_000, live_tgids={20, 50, 99})
    procfs.listings = 0
    clock.now += 6
    collector.sample()
    source.next_delta = TickDelta(0, 1_000_000_000, live_tgids={20, 50})
    clock.now += 0.25
    collector.sample()
    assert source.forgotten == {99}  # 50 was missing from the listing but is there: kept
    assert procfs.listings == 1  # the rescan's listing served the dead-process check too
    # Many missing (a host where processes come and go): one listing after the read instead.
    many = set(range(1000, 1000 + _Collector.CONFIRM_MISSING_MAX + 1))
    source.next_delta = TickDelta(0, 1_000_000_000, live_tgids={20, 50} | many)
    procfs.listings = 0
    clock.now += 6
    collector.sample()
    clock.now += 0.25
    collector.sample()
    assert procfs.listings == 2 and source.forgotten == {99} | many


class JudgingProcFS(ProcFS):
    """Counts the stat reads a rescan makes: one per process judged against a comm selector."""

    def __init__(self, root):
        super().__init__(root)
        self.judged: list[int] = []

    def stat(self, pid, tid=None):
        if tid is None:
            self.judged.append(pid)
        return super().stat(pid, tid)


def judging_collector(tmp_path, processes, users=(), task_events=False):
    """A collector protecting comm "api" (run by `users`, when given) over a fake /proc of
    `processes`, its stat reads counted; its source sends task events with `task_events`."""
    proc = FakeProc(tmp_path / "proc")
    for process in processes:
        proc.add(process)
    proc.write()
    source, clock, procfs = RecordingSource(), Clock(), JudgingProcFS(proc.root)
    source.has_task_events = task_events
    collector = Collector(source, ProtectSelectors.build(comms=["api"], users=users), procfs, rescan_s=5.0,
                          mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    return proc, source, clock, procfs, collector


def test_a_rescan_judges_new_processes_and_every_process_only_at_a_full_rescan(tmp_path):
    from remediator.collector import FULL_RESCAN_S

    proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "fluent-bit"), FakeProcess(30, "cron")))
    collector.start()
    assert {1, 10, 20, 30} <= set(procfs.judged)  # the first rescan judges every process
    # A new process and one renamed without exec: the new one is judged (and protected); the
    # renamed one, seen before, waits for the full rescan.
    proc.add(FakeProcess(40, "api"))
    proc.processes[20].comm = "api"
    proc.write()
    procfs.judged.clear()
    clock.now += 6
    collector.sample()
    assert 40 in procfs.judged and not {1, 20, 30} & set(procfs.judged)
    assert set(collector.protected) == {10, 40}
    clock.now += FULL_RESCAN_S
    collector.sample()
    assert set(collector.protected) == {10, 20, 40}
    # Lost exec events make the next rescan a full one.
    proc.processes[30].comm = "api"
    proc.write()
    source.next_delta = TickDelta(0, 1_000_000_000, lost={"exec_events_dropped": 3})
    clock.now += 0.25
    collector.sample()
    source.next_delta = TickDelta(0, 1_000_000_000)
    clock.now += 6
    collector.sample()
    assert set(collector.protected) == {10, 20, 30, 40}


def test_with_every_change_told_by_the_kernel_a_comm_rescan_judges_every_process_only_every_ten_minutes(tmp_path):
    """Exec, rename and cgroup-move events (none lost) and comm selectors: a process can come to
    match only at an event or as a new pid, so the full rescan is a rarer safety net. With cgroup
    or unit selectors (a cgroup renamed sends no event) it stays at FULL_RESCAN_S."""
    from remediator.collector import FULL_RESCAN_S, FULL_RESCAN_WITH_EVENTS_S

    _proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "fluent-bit")), task_events=True)
    assert collector.full_rescan_s == FULL_RESCAN_WITH_EVENTS_S
    collector.start()
    procfs.judged.clear()
    for _ in range(int(FULL_RESCAN_S / 5) + 1):
        clock.now += 5
        collector.sample()
    assert not {1, 20} & set(procfs.judged)  # past FULL_RESCAN_S: no full rescan
    clock.now += FULL_RESCAN_WITH_EVENTS_S
    collector.sample()
    assert {1, 20} <= set(procfs.judged)
    cgroups = Collector(source, ProtectSelectors.build(comms=["api"], cgroups=["/system.slice/api.service"]), procfs)
    assert cgroups.full_rescan_s == FULL_RESCAN_S
    source.has_task_events = False
    assert collector.full_rescan_s == FULL_RESCAN_S


def test_a_process_refused_by_the_users_check_is_judged_again_at_the_next_rescan(tmp_path):
    """A daemon exec'd as root that drops its privileges a moment later: refused at its exec (and
    at a rescan), protected at the next rescan once it runs as a protect user, not at the full one."""
    proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api", uid=33), FakeProcess(20, "api", uid=0)),
        users=[33], task_events=True)
    collector.start()
    assert set(collector.protected) == {10}
    # 20 drops to uid 33; 30 execs as root and drops a moment after the exec event was judged.
    proc.processes[20].uid = 33
    proc.add(FakeProcess(30, "api", uid=0))
    proc.write()
    clock.now += 5
    collector.sample()
    assert set(collector.protected) == {10, 20}  # 30 was new: judged (and refused) at this rescan
    source.pending_execs = [ExecEvent(0, 30, 30, "/usr/sbin/api")]
    clock.now += 0.25
    collector.sample()
    assert set(collector.protected) == {10, 20}
    proc.processes[30].uid = 33
    proc.write()
    clock.now += 5
    collector.sample()
    assert set(collector.protected) == {10, 20, 30}


def test_a_users_look_alikes_by_the_hundred_are_not_all_judged_again_at_every_rescan(tmp_path):
    """Refused processes are judged again at each rescan only up to REFUSED_REJUDGED_MAX: a
    local user's idle look-alikes cannot make the daemon read each of them every 5 s."""
    from remediator.collector import REFUSED_REJUDGED_MAX

    look_alikes = [FakeProcess(1000 + i, "api", uid=1000) for i in range(REFUSED_REJUDGED_MAX + 50)]
    _proc, _source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api", uid=33), *look_alikes), users=[33], task_events=True)
    collector.start()
    assert set(collector.protected) == {10}
    procfs.judged.clear()
    clock.now += 5
    collector.sample()
    judged_again = {pid for pid in procfs.judged if pid >= 1000}
    assert len(judged_again) == REFUSED_REJUDGED_MAX


def test_a_process_renamed_or_moved_is_judged_at_its_task_event_within_a_tick(tmp_path, monkeypatch):
    """Where the kernel tells of renames and cgroup moves (task events), such a process is judged
    in the tick that reads the event, not at the next full rescan, and what the sample says about
    it is read afresh; lost task events make the next rescan a full one."""
    proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "node"), FakeProcess(30, "cron")))
    source.has_task_events = True
    collector.start()
    busy = TickDelta(0, 250_000_000, usage={20: (200_000_000, 100_000_000)}, blame={20: 5_000}, wait_ns=6_000)
    source.next_delta = busy
    clock.now += 0.25
    assert collector.sample().processes[20].comm == "node"
    proc.processes[20].comm = "api"  # process.title = "api": a prctl rename, no exec
    proc.write()
    procfs.judged.clear()
    source.pending_changes = {20}
    clock.now += 0.25  # no rescan due
    sample = collector.sample()
    assert set(collector.protected) == {10, 20} and set(procfs.judged) == {20}  # judged, and read for the sample
    assert collector.changed == {20} and sample.processes[20].comm == "api"
    clock.now += 0.25
    source.next_delta = TickDelta(0, 1_000_000_000, usage={20: (900_000_000, 0)})
    assert collector.sample().protected.pids == (10, 20)
    assert collector.changed == set()
    # A flood of renames (a local user renaming many processes in a loop): CHANGED_PER_TICK_MAX are
    # judged a tick, oldest first, the rest wait their turn; past CHANGED_QUEUE_MAX waiting, they are
    # counted as lost and the next rescan judges every process.
    from remediator import collector as collector_module
    from remediator.collector import CHANGED_PER_TICK_MAX
    flood = list(range(1000, 1000 + CHANGED_PER_TICK_MAX + 1))
    for pid in flood:
        proc.add(FakeProcess(pid, "api" if pid == flood[-1] else "spam"))
    proc.write()
    procfs.judged.clear()
    source.pending_changes = set(flood)
    clock.now += 0.25
    collector.sample()
    assert len(collector.changed) == CHANGED_PER_TICK_MAX and flood[-1] not in collector.protected
    clock.now += 0.25
    collector.sample()
    assert collector.changed == {flood[-1]} and flood[-1] in collector.protected
    monkeypatch.setattr(collector_module, "CHANGED_QUEUE_MAX", 3)
    source.pending_changes = set(range(2000, 2004))
    clock.now += 0.25
    assert collector.sample().lost == {"task_events_over_cap": 4} and collector.changed == set()
    # Lost task events: the next rescan judges every process.
    proc.processes[30].comm = "api"
    proc.write()
    source.next_delta = TickDelta(0, 1_000_000_000, lost={"task_events_dropped": 1})
    clock.now += 0.25
    collector.sample()
    assert 30 not in collector.protected
    source.next_delta = TickDelta(0, 1_000_000_000)
    clock.now += 6
    collector.sample()
    assert set(collector.protected) == {10, 20, 30, flood[-1]}


def test_a_process_renaming_itself_all_the_time_is_judged_every_few_seconds_and_its_last_name_counts(tmp_path):
    """A worker that retitles itself for every job sends a task event every tick: it is judged at
    its first rename at once, then at most every CHANGED_AGAIN_AFTER_S, and the rename that came
    in between is judged when that time is up, not lost."""
    from remediator.collector import CHANGED_AGAIN_AFTER_S

    proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "worker")))
    source.has_task_events = True
    collector.start()
    judged_ticks = []
    for tick in range(int(CHANGED_AGAIN_AFTER_S / 0.25) * 2 + 8):
        if tick == 30:
            proc.processes[20].comm = "api"  # its last title, between two judgements
            proc.write()
        source.pending_changes = {20} if tick <= 30 else set()
        clock.now += 0.25
        collector.sample()
        if 20 in collector.changed:
            judged_ticks.append(tick)
        if tick == 39:
            assert 20 not in collector.protected  # renamed at tick 30, judged at its turn
    assert judged_ticks == [0, 20, 40] and 20 in collector.protected


def test_a_rescan_of_pids_named_lists_no_process(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(10, "api"))
    proc.write()
    listings = []

    class ListingProcFS(ProcFS):
        def pids(self):
            listings.append(1)
            return super().pids()

    clock = Clock()
    collector = Collector(RecordingSource(), ProtectSelectors.build(pids=[10]), ListingProcFS(proc.root), rescan_s=5.0,
                          mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    clock.now += 6
    collector.sample()
    assert collector.protected == {10: {10}}
    assert len(listings) == 1  # the dead-process check after the rescan's read, not the rescan itself


def test_without_exec_events_every_rescan_judges_every_process(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    for process in (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(20, "sh")):
        proc.add(process)
    proc.write()
    source, clock, procfs = RecordingSource(), Clock(), JudgingProcFS(proc.root)
    source.has_exec_events = False  # the procfs source: an exec in place keeps its pid and no event says so
    collector = Collector(source, ProtectSelectors.build(comms=["api"]), procfs, mono_clock=clock,
                          wall_clock=lambda: 1_700_000_000.0)
    collector.start()
    proc.processes[20].comm = "api"  # sh exec'd the service in place
    proc.write()
    clock.now += 0.25
    collector.sample()
    assert set(collector.protected) == {10, 20}


class StatCountingProcFS(ProcFS):
    def __init__(self, root):
        super().__init__(root)
        self.stat_reads: list[int] = []

    def stat(self, pid, tid=None):
        self.stat_reads.append(pid)
        return super().stat(pid, tid)


def test_a_new_child_of_a_process_in_the_cache_reads_its_parent_not_the_whole_chain(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    for process in (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(100, "sshd", ppid=1, start_time=50),
                    FakeProcess(200, "bash", ppid=100, start_time=60), FakeProcess(300, "make", ppid=200, start_time=70),
                    FakeProcess(400, "cc1", ppid=300, start_time=80)):
        proc.add(process)
    proc.write()
    procfs, clock = StatCountingProcFS(proc.root), Clock()
    collector = Collector(RecordingSource(), ProtectSelectors.build(comms=["api"]), procfs, rescan_s=5.0,
                          mono_clock=clock, wall_clock=lambda: 1_700_000_000.0)
    chain = ((300, "make"), (200, "bash"), (100, "sshd"))
    assert collector.info(300).ancestors == chain[1:]
    procfs.stat_reads.clear()
    assert collector.info(400).ancestors == chain  # as a walk up /proc finds it
    assert 300 in procfs.stat_reads and not {200, 100} & set(procfs.stat_reads)
    # Another process took the parent's pid: its own chain is read, not the cached one's.
    proc.remove(300)
    proc.add(FakeProcess(300, "make", ppid=100, start_time=75))
    proc.add(FakeProcess(401, "cc1", ppid=300, start_time=90))
    proc.write()
    procfs.stat_reads.clear()
    assert collector.info(401).ancestors == ((300, "make"), (100, "sshd"))
    # Past the interval the cache trusts an entry for, the chain is read again as well.
    collector.info(300)
    clock.now += 6
    proc.add(FakeProcess(402, "cc1", ppid=300, start_time=95))
    proc.write()
    procfs.stat_reads.clear()
    assert collector.info(402).ancestors == ((300, "make"), (100, "sshd"))
    assert 100 in procfs.stat_reads


def test_a_process_read_at_its_exec_is_judged_by_comm_without_a_stat_of_its_own(tmp_path):
    """With the burst watch reading every exec'd process in the same tick (a sketch, or in full),
    the collector reads it so at its exec event and the comm selectors judge it from that read;
    the next rescan, which judges new pids, takes the comm from the same read while it is trusted."""
    proc, source, clock, procfs, collector = judging_collector(tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api")))
    collector.exec_reader = collector.sketch
    collector.start()
    proc.add(FakeProcess(40, "sleep"))
    proc.add(FakeProcess(50, "api"))
    proc.write()
    source.pending_execs += [ExecEvent(0, 40, 40, "/bin/sleep"), ExecEvent(0, 50, 50, "/usr/bin/api")]
    procfs.judged.clear()
    clock.now += 0.25
    collector.sample()
    assert procfs.judged.count(40) == 1  # the sketch's own stat, nothing else
    assert 50 in collector.protected
    assert collector.sketch(40) is not None and procfs.judged.count(40) == 1  # the burst watch's read: the cache
    assert 40 not in collector._info_cache  # a sketch is never taken as the process's info
    procfs.judged.clear()
    clock.now += 4.9  # the rescan: 40 is new to its listing, read 4.9 s ago
    collector.sample()
    assert 40 not in procfs.judged

    def exec_of(pid):
        proc.add(FakeProcess(pid, "sleep"))
        proc.write()
        source.pending_execs.append(ExecEvent(0, pid, pid, "/bin/sleep"))
        procfs.judged.clear()
        clock.now += 0.25
        collector.sample()
        return procfs.judged.count(pid)

    collector.exec_reader = collector.info  # a full reader works the same way
    assert exec_of(45) == 1 and 45 in collector._info_cache
    collector.exec_reader = None  # without another reader, the exec is judged by a stat alone, as before
    assert exec_of(60) == 1 and 60 not in collector._info_cache and 60 not in collector._sketches


def test_the_children_of_a_parent_walked_through_read_its_stat_alone(tmp_path):
    """A loop under a deep chain (a CI job: sh under make under sh) execs child after child. The
    collector holds no info of the loop itself (it barely runs), yet only the first child walks
    the chain: the next ones read their parent's stat, find it is the very process walked
    through (pid, start time, comm) and take the chain above it, until the interval info()
    trusts has passed or the pid names another process."""
    proc, source, clock, procfs, collector = judging_collector(
        tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api"), FakeProcess(100, "sh", ppid=1, start_time=100),
                   FakeProcess(200, "make", ppid=100, start_time=200), FakeProcess(300, "sh", ppid=200, start_time=300)))
    collector.start()
    chain = ((300, "sh"), (200, "make"), (100, "sh"))

    def child(pid):
        proc.add(FakeProcess(pid, "cc1", ppid=300, start_time=pid))
        proc.write()
        procfs.judged.clear()
        return collector.info(pid)

    assert child(400).ancestors == chain and procfs.judged == [400, 300, 200, 100]
    clock.now += 1
    assert child(401).ancestors == chain and procfs.judged == [401, 300]
    clock.now += 5  # past the trusted interval: walked again
    assert child(402).ancestors == chain and procfs.judged == [402, 300, 200, 100]
    # pid 300 now names another process (its start time differs): not the one remembered; its
    # parent make is, so the walk stops there.
    proc.processes[300].start_time = 350
    proc.processes[300].comm = "bash"
    assert child(403).ancestors == ((300, "bash"), (200, "make"), (100, "sh")) and procfs.judged == [403, 300, 200]


def test_with_placement_at_exec_only_the_wanted_exec_d_processes_are_read_in_full(tmp_path):
    """track_execs names exec'd processes in the sample for `always` policies; exec_wanted judges
    each from its sketch, so a process no such policy may govern costs no cgroup or status read
    and is not in the sample."""
    proc, source, clock, procfs, collector = judging_collector(tmp_path, (FakeProcess(1, "init"), FakeProcess(10, "api")))
    collector.track_execs = True
    collector.exec_wanted = lambda sketch: sketch.comm == "logrotate"
    collector.start()
    proc.add(FakeProcess(40, "sleep", uid=1000))
    proc.add(FakeProcess(41, "logrotate", uid=0))
    proc.write()
    source.pending_execs += [ExecEvent(0, 40, 40, "/bin/sleep"), ExecEvent(0, 41, 41, "/usr/sbin/logrotate")]
    clock.now += 0.25
    sample = collector.sample()
    assert 41 in sample.processes and sample.processes[41].uid == 0  # read in full
    assert 40 not in sample.processes and 40 not in collector._info_cache and 40 in collector._sketches
    # Without a judgement, every exec'd process is named, as before.
    collector.exec_wanted = None
    proc.add(FakeProcess(42, "sleep", uid=1000))
    proc.write()
    source.pending_execs.append(ExecEvent(0, 42, 42, "/bin/sleep"))
    clock.now += 0.25
    assert collector.sample().processes[42].uid == 1000


def test_the_cached_readings_hold_a_bounded_amount_of_command_line_text(tmp_path, monkeypatch):
    """A user's forked children share a long argument list at no cost to the user; a cache bounded
    by its count alone would hold 8,192 copies of it. Sketches are dropped together once they hold
    the bound (and read again at most once each); the kept readings are trimmed, oldest first."""
    from remediator import collector as collector_module

    monkeypatch.setattr(collector_module, "CACHED_CMDLINE_BYTES_MAX", 10_000)
    proc, _source, clock, collector = setup(tmp_path)
    for pid in range(100, 112):
        proc.add(FakeProcess(pid, "sleep", start_time=pid, cmdline=("sleep", "x" * 2000)))
    proc.write()
    for pid in range(100, 112):
        assert collector.sketch(pid).cmdline == ("sleep", "x" * 2000)
        assert collector._sketches.cmdline_bytes == sum(map(collector_module.cmdline_bytes, (s for s, _ in collector._sketches.values())))
        assert collector._sketches.cmdline_bytes <= 10_000 + 2005
    for pid in range(100, 112):
        clock.now += 0.01
        collector.info(pid)
    collector._trim_info_cache(keep=())
    assert collector._info_cache.cmdline_bytes <= 5_000 and list(collector._info_cache) == [110, 111]  # the newest
    collector._info_cache.pop(111)
    collector._info_cache.pop(12345)  # not there: nothing counted
    assert collector._info_cache.cmdline_bytes == 2005


def test_a_cmdline_not_read_because_reads_block_is_read_again_not_kept_empty(tmp_path):
    """With reads stuck (a user's processes whose cmdline blocks), a process read meanwhile gets
    an empty cmdline: taken as unknown then, but read again next time, or a cmdline policy
    (fluentd, logstash) would never match it for its whole life."""
    import os

    from test_procfs_blocking import release

    proc, _source, clock, collector = setup(tmp_path)
    proc.add(FakeProcess(40, "ruby", cmdline=("ruby", "/usr/bin/fluentd")))
    proc.add(FakeProcess(41, "stuck"))
    proc.write()
    fifo = proc.root / "41" / "cmdline"
    fifo.unlink()
    os.mkfifo(fifo)
    collector.procfs._bounded.timeout_s = 0.1
    collector.procfs._bounded.max_stuck = 1
    try:
        assert collector.info(41).cmdline == ()  # blocks: one read stuck, the most there may be
        assert collector.info(40).cmdline == ()  # refused: too many reads stuck
        release(fifo)
        for worker in list(collector.procfs._bounded.stuck.values()):
            worker.join(10)
        clock.now += 0.25  # the next tick, well within the time a reading is trusted
        assert collector.info(40).cmdline == ("ruby", "/usr/bin/fluentd")
    finally:
        release(fifo)
