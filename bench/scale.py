"""The daemon's cost on a big host: one tick's CPU, phase by phase, on a synthetic busy host, and a
model of the same tick on 64 and 192 CPUs from the measured per-entry costs.

The host (bench/scale_host.c): 1,000 small processes that each wake 25 times a second and work a
few microseconds, and a protected service with 500 threads that do the same at 10/s: about 50,000
context switches a second. The daemon's tick runs in this process against the real probes, the
shipped policies and the service protected, and each phase's thread CPU time is taken apart:

  map reads   the probes' snapshot (wait stats, cpu state, proc_cpu through the changed set, blame)
  delta       bpf_delta: the tick's usage, peaks and blame from two snapshots
  matching    the collector's protected-set upkeep and process metadata, and policy selection
              (its share inside the engine is not separable; it is counted under engine)
  engine      decide() with the shipped policies
  bursts      BurstWatch.refresh: the burst candidates kept current
  auto cpus   request_cpus = "auto" (cached: read again only when the protected set changes)
  audit       writing the tick's decisions (none on a quiet host: shown for completeness)

The probes load as the daemon loads them (probe_settings_for its tick): an entry is read once it
has the report floor (1/64 of the tick, 3.9 ms at 250 ms) of on-CPU or blamed time not yet read.
The same tick is measured again, side by side, with the floor at --also-floor-ms (1 ms, the
floor before it followed the tick), to show what the floor buys: both sets of probes load at once
on the same host, and each tick period runs both ticks in turn, in alternating order.

The model of the same tick on 64 and 192 CPUs. proc_cpu holds one entry per (process, CPU it ran
on), but a tick reads only the entries each CPU queued as changed (or at a thread's exit): the
entries read per tick are bounded by the CPU time the host's small processes spent divided by the
floor, not by processes x CPUs, and the same work spread over more CPUs queues no more of them
(fewer: each entry fills more slowly). So for this host's work the entries read stay as measured
here; a bigger host doing proportionally more work reads proportionally more. What grows with the CPU count is per-CPU work: the
per-CPU wait statistics (a histogram each) and the CPU states, read and summed every tick; that is
timed here on buffers of 64 and 192 CPUs' size and added. For comparison, a full read of every
entry of a host where every process ran on every CPU, at the per-entry cost measured here.

    sudo .venv/bin/python bench/scale.py                 ~8 min (each part after a 45 s warm-up)
    sudo .venv/bin/python bench/scale.py --processes 300 --ticks 12
    sudo .venv/bin/python bench/scale.py --daemon-profile 40    where the daemon's own CPU goes
    sudo .venv/bin/python bench/scale.py --protect-by comm --also-tick-ms 500   what a slower tick saves
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import cProfile
import io
import os
import pstats
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from remediator.audit import AuditLog, audit_record  # noqa: E402
from remediator.burstwatch import BurstWatch  # noqa: E402
from remediator.collector import Collector  # noqa: E402
from remediator.cpulist import online_cpus  # noqa: E402
from remediator.engine import EngineSettings, EngineState, decide, history_for  # noqa: E402
from remediator.placement import auto_request_cpus  # noqa: E402
from remediator.policy import load_policies  # noqa: E402
from remediator import sources as sources_module  # noqa: E402
from remediator.probes import ProbeSettings, probe_settings_for  # noqa: E402
from remediator.procfs import ProcFS  # noqa: E402
from remediator.safety import daemon_identity  # noqa: E402
from remediator.selectors import ProtectSelectors  # noqa: E402
from remediator.sources import BpfSource  # noqa: E402

import old_ref  # noqa: E402

TICK_S = 0.25
GOAL_PERCENT = 1.0
REMEDIATOR = str(Path(sys.executable).with_name("remediator"))


def context_switches() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    return 0


class Phases:
    """Thread CPU time per phase, per tick."""

    def __init__(self):
        self.ticks: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def add(self, name: str, ns: int) -> None:
        self.current[name] = self.current.get(name, 0.0) + ns / 1e6

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            start = time.thread_time_ns()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(name, time.thread_time_ns() - start)
        return wrapper

    def next_tick(self) -> None:
        self.ticks.append(self.current)
        self.current = {}

    def median(self, name: str) -> float:
        return statistics.median(tick.get(name, 0.0) for tick in self.ticks)

    def mean(self, name: str) -> float:
        """What the daemon's CPU share is: the ticks that rescan /proc (every 5 s) count too."""
        return statistics.mean(tick.get(name, 0.0) for tick in self.ticks)


def start_host(args, directory: Path) -> tuple[subprocess.Popen, list[int]]:
    """The synthetic host, and the pids of its service's processes."""
    binary = directory / "scale_host"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(HERE / "scale_host.c")], check=True)
    host = subprocess.Popen([str(binary), str(args.processes), str(args.wakeups), str(args.service_threads),
                             str(args.service_wakeups), str(getattr(args, "service_processes", 1))],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = host.stdout.readline()
    if not line.startswith("ready"):
        host.kill()
        raise SystemExit(f"scale_host did not start: {line!r}")
    return host, [int(pid) for pid in line.split()[1:]]


class Rig:
    """One daemon's tick in this process, against its own probes (loaded with `settings`): the
    collector, the burst watch, the engine state and the audit log, each phase timed apart."""

    def __init__(self, settings: ProbeSettings, procfs: ProcFS, services: list[int], policies, me, directory: Path,
                 delta_phases: list):
        self.phases = Phases()
        self.source = BpfSource(procfs, settings)
        self.probes = self.source.probes
        self.read_counts: list[int] = []  # entries read per tick (the changed set)
        timed_snapshot = self.phases.timed("map reads", self.probes.snapshot)

        def counted():
            delta_phases[0] = self.phases  # the delta that follows is this rig's
            result = timed_snapshot()
            self.read_counts.append(len(result.proc_cpu_changed or ()))  # the warm-up's are dropped below
            return result

        self.probes.snapshot = counted
        self.collector = Collector(self.source, ProtectSelectors.build(pids=services), procfs)
        self.policies, self.me = policies, me
        self.bursts = BurstWatch(self.source, procfs, me, info_of=self.collector.info, sketch_of=self.collector.sketch)
        self.bursts.set_policies(policies)
        self.collector.exec_reader = self.bursts.reader  # as the daemon wires them
        self.audit = AuditLog(directory / "audit.jsonl")
        self.state = EngineState()
        self.history_s, self.history_windows = history_for(policies, TICK_S)
        self.cached_cpus = None

    def tick(self, steady: bool) -> None:
        phases = self.phases
        start = time.thread_time_ns()
        sample = self.collector.sample()
        phases.add("matching", time.thread_time_ns() - start)  # the read phases are taken out below
        start = time.thread_time_ns()
        online = online_cpus()
        if self.cached_cpus is None:  # the daemon reads it again only when the protected set changes
            self.cached_cpus = auto_request_cpus(self.collector.protected, online, lambda pid: None)
        phases.add("auto cpus", time.thread_time_ns() - start)
        settings = EngineSettings(request_cpus=self.cached_cpus, online_cpus=online, max_changes_per_minute=10,
                                  self_pid=self.me.pid, self_start_time=self.me.start_time,
                                  history_s=self.history_s, history_windows=self.history_windows)
        start = time.thread_time_ns()
        self.state, decisions = decide(self.state, sample, self.policies, settings)
        phases.add("engine", time.thread_time_ns() - start)
        start = time.thread_time_ns()
        self.bursts.refresh(sample.processes.values(), sample.protected.pids)
        phases.add("bursts", time.thread_time_ns() - start)
        start = time.thread_time_ns()
        for decision in decisions:
            self.audit.write(audit_record(decision, None, "dry-run"))
        phases.add("audit", time.thread_time_ns() - start)
        current = phases.current
        current["matching"] -= current.get("map reads", 0.0) + current.get("delta", 0.0)
        if steady:
            phases.next_tick()
        else:
            phases.current = {}  # the first tick reads everything and judges every process: not steady state

    def close(self) -> None:
        self.collector.close()
        self.audit.close()


def measure(args, settings_list: list[ProbeSettings]) -> list[dict]:
    """The tick of each settings, measured side by side: each its own probes loaded at once on the
    same host, their ticks taken in turn (in alternating order) every tick period."""
    procfs = ProcFS()
    directory = Path(tempfile.mkdtemp(prefix="remediator-scale-"))
    host, services = start_host(args, directory)
    rigs: list[Rig] = []
    original_delta = sources_module.bpf_delta
    try:
        time.sleep(1.0)
        before, started = context_switches(), time.monotonic()
        time.sleep(1.0)
        switches_per_s = (context_switches() - before) / (time.monotonic() - started)

        delta_phases: list = [None]  # the rig whose snapshot came last

        def timed_delta(*a, **k):
            start = time.thread_time_ns()
            try:
                return original_delta(*a, **k)
            finally:
                delta_phases[0].add("delta", time.thread_time_ns() - start)

        sources_module.bpf_delta = timed_delta
        policies = load_policies([ROOT / "policies"], online_cpus=online_cpus())
        me = daemon_identity(procfs)  # this script plays the daemon
        for index, settings in enumerate(settings_list):
            place = directory / f"rig-{index}"
            place.mkdir()
            rigs.append(Rig(settings, procfs, services, policies, me, place, delta_phases))
        for rig in rigs:
            rig.collector.start()
        profile = cProfile.Profile(time.thread_time_ns, 1e-9) if args.profile else None
        next_tick = time.monotonic()
        # Not measured until the host is in its steady state: a process that barely runs is
        # first read once it has spent the report floor, tens of seconds after the probes load.
        warmup = max(1, round(args.warmup / TICK_S))
        for tick in range(warmup + args.ticks):
            next_tick += TICK_S
            time.sleep(max(0.0, next_tick - time.monotonic()))
            order = rigs if tick % 2 == 0 else rigs[::-1]  # neither always finds the caches the other warmed
            for rig in order:
                profiled = profile is not None and tick >= warmup and rig is rigs[0]
                if profiled:
                    profile.enable()  # steady state only: the first tick judges every process
                rig.tick(steady=tick >= warmup)
                if profiled:
                    profile.disable()
        if profile is not None:
            text = io.StringIO()
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(args.profile)
            stats.sort_stats("cumulative").print_stats(args.profile)
            print(text.getvalue(), file=sys.stderr)
        return [rig_result(rig, switches_per_s, warmup) for rig in rigs]
    finally:
        sources_module.bpf_delta = original_delta
        for rig in rigs:
            rig.close()
        os.killpg(host.pid, 9)
        host.wait()
        shutil.rmtree(directory, ignore_errors=True)


def rig_result(rig: Rig, switches_per_s: float, warmup: int) -> dict:
    """A rig's phases, and its per-entry costs for the model."""
    probes, phases = rig.probes, rig.phases
    entries = len(probes._proc_cache)
    start = time.thread_time_ns()
    full = probes._read_proc_cpu()
    full_ms = (time.thread_time_ns() - start) / 1e6
    start = time.thread_time_ns()
    uncached_cpus = auto_request_cpus(rig.collector.protected, online_cpus(), lambda pid: None)
    uncached_ms = (time.thread_time_ns() - start) / 1e6
    assert uncached_cpus == rig.cached_cpus
    steady_reads = rig.read_counts[warmup:]
    names = ("map reads", "delta", "matching", "engine", "bursts", "auto cpus", "audit")
    return {
        "switches_per_s": switches_per_s,
        "entries": entries,
        "full_entries": len(full),
        "full_read_ms": full_ms,
        "uncached_auto_cpus_ms": uncached_ms,
        "threads": sum(len(tids) for tids in rig.collector.protected.values()),
        "changed_now": statistics.median(steady_reads) if steady_reads else 0,
        "changed_mean": statistics.mean(steady_reads) if steady_reads else 0,
        "per_phase_ms": {name: phases.median(name) for name in names},
        "per_phase_mean_ms": {name: phases.mean(name) for name in names},
        "tick_ms": statistics.median(sum(tick.get(name, 0.0) for name in names) for tick in phases.ticks),
        "tick_mean_ms": statistics.mean(sum(tick.get(name, 0.0) for name in names) for tick in phases.ticks),
        "ticks": len(phases.ticks),
    }


def cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (or of one of its threads), in clock ticks."""
    where = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# The daemon with its main thread profiled between SIGUSR1 and SIGUSR2 (the steady state only),
# the profile written to argv[1].
PROFILED_DAEMON = """
import cProfile, signal, sys, time
from pathlib import Path
from remediator.cli import main
out = Path(sys.argv[1])
profile = cProfile.Profile(time.thread_time_ns, 1e-9)  # CPU time: the waits between ticks cost none
def start(signum, frame):
    profile.enable()
def stop(signum, frame):
    profile.disable()
    profile.dump_stats(str(out))
    out.with_suffix(".done").touch()
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["remediator"] + sys.argv[2:]
sys.exit(main())
"""


PROTECT_FORMS = {
    "pid": "[protect] pids: only that process is looked at when the protected set is resolved again",
    "comm": "[protect] comm: new processes judged at a rescan every 5 s, every process every 10 min "
            "(every 60 s with cgroup or unit selectors)",
}


def thread_cpu_ticks(pid: int) -> dict[int, int]:
    """Each thread's utime + stime, in clock ticks."""
    result = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            result[int(task.name)] = cpu_ticks(pid, int(task.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return result


BY_COMM = 'comm = ["scale-service"]'  # the synthetic service, as a [protect] line


def daemon_config(place: Path, protect: str, generated_by: str, metrics_port: int | None = None,
                  tick_s: float = TICK_S) -> str:
    """The config the benches run the daemon as shipped with on this host: dry-run, the shipped
    policies, the service named by `protect` (a [protect] line), request_cpus "auto", the journal
    and audit log in `place`, and metrics on loopback at `metrics_port` (None: none)."""
    metrics = "" if metrics_port is None else f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    return f"""# generated by {generated_by}
[protect]
{protect}
request_cpus = "auto"
[daemon]
mode = "dry-run"
tick = "{tick_s * 1000:g}ms"
policies = ["{ROOT / 'policies'}"]
journal = "{place / 'journal.jsonl'}"
audit_log = "{place / 'audit.jsonl'}"
{metrics}"""


def measure_daemon(args, protect_by: str, old_tree: Path | None) -> dict:
    """The daemon as shipped (`remediator run`, dry-run, the shipped policies, the synthetic
    service protected) on the same host: its whole CPU time, the tick's phases and all the rest
    (the rolling recording, metrics, state file, burst watch, rescans), over --daemon-seconds
    after a warm-up. With `old_tree`, that tree's daemon runs beside it at the same time, on the
    same host and its noise: {"this tree": {...}, "old": {...}}. With --also-tick-ms, this tree's daemon
    at that tick runs beside them too ("this tree, tick N ms")."""
    directory = Path(tempfile.mkdtemp(prefix="remediator-scale-daemon-"))
    host, services = start_host(args, directory)
    daemons: dict[str, subprocess.Popen] = {}
    trees = {"this tree": (None, TICK_S), **({"old": (old_tree, TICK_S)} if old_tree is not None else {})}
    if args.also_tick_ms > 0:
        trees[also_tick_label(args)] = (None, args.also_tick_ms / 1000)
    try:
        for index, (label, (tree, tick_s)) in enumerate(trees.items()):
            place = directory / f"daemon-{index}"
            place.mkdir()
            config = place / "remediator.toml"
            protect = f"pids = [{', '.join(map(str, services))}]" if protect_by == "pid" else BY_COMM
            config.write_text(daemon_config(place, protect, "bench/scale.py", args.daemon_metrics_port + index, tick_s))
            if label == "this tree" and args.daemon_profile:
                command = [sys.executable, "-c", PROFILED_DAEMON, str(place / "daemon.prof"), "run", "--config", str(config)]
                env = None
            else:
                command, env = daemon_command(config, tree)
            daemons[label] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(place / "daemon.log", "w"),
                                              env=env, cwd=str(tree or ROOT))
        time.sleep(args.warmup)
        for index, (label, daemon) in enumerate(daemons.items()):
            if daemon.poll() is not None:
                log = (directory / f"daemon-{index}" / "daemon.log").read_text()[-2000:]
                raise SystemExit(f"scale: the daemon ({label}) exited: {log}")
        hz = os.sysconf("SC_CLK_TCK")
        profiled = daemons["this tree"] if args.daemon_profile else None
        if profiled is not None:
            profiled.send_signal(signal.SIGUSR1)
        started = time.monotonic()
        before = {label: (cpu_ticks(daemon.pid), thread_cpu_ticks(daemon.pid)) for label, daemon in daemons.items()}
        # One period after another: the first minutes name the host's processes for the first time
        # (a full /proc reading each), the later ones show the daemon once it knows them.
        periods: dict[str, list[float]] = {label: [] for label in daemons}
        for _ in range(args.daemon_periods):
            period_started = time.monotonic()
            period_before = {label: cpu_ticks(daemon.pid) for label, daemon in daemons.items()}
            time.sleep(args.daemon_seconds)
            period_s = time.monotonic() - period_started
            for label, daemon in daemons.items():
                periods[label].append(100.0 * (cpu_ticks(daemon.pid) - period_before[label]) / hz / period_s)
        elapsed = time.monotonic() - started
        results = {}
        for label, daemon in daemons.items():
            ticks, threads_before = before[label]
            used_s = (cpu_ticks(daemon.pid) - ticks) / hz
            threads = {tid: 100.0 * (used - threads_before.get(tid, 0)) / hz / elapsed
                       for tid, used in thread_cpu_ticks(daemon.pid).items()}
            results[label] = {"daemon_percent": 100.0 * used_s / elapsed, "seconds": elapsed,
                              "threads_percent": threads, "periods_percent": periods[label]}
        if profiled is not None:
            profile_out = directory / "daemon-0" / "daemon.prof"
            profiled.send_signal(signal.SIGUSR2)
            for _ in range(100):
                if profile_out.exists() and profile_out.with_suffix(".done").exists():
                    break
                time.sleep(0.1)
            text = io.StringIO()
            stats = pstats.Stats(str(profile_out), stream=text)
            stats.sort_stats("tottime").print_stats(args.daemon_profile)
            stats.sort_stats("cumulative").print_stats(args.daemon_profile)
            print(text.getvalue(), file=sys.stderr)
            if args.keep_profile:
                shutil.copyfile(profile_out, args.keep_profile)  # for pstats' callers and callees
        return results
    finally:
        stop_daemons(daemons.values())
        os.killpg(host.pid, 9)
        host.wait()
        shutil.rmtree(directory, ignore_errors=True)


def also_tick_label(args) -> str:
    return f"this tree, tick {args.also_tick_ms:g} ms"


def daemon_command(config: Path, tree: Path | None) -> tuple[list[str], dict[str, str] | None]:
    """The command and environment that run the daemon with `config`: this tree's as installed, or
    `tree`'s code and probes (an --old-ref, see old_ref.py) on this interpreter."""
    if tree is None:
        return [REMEDIATOR, "run", "--config", str(config)], None
    return [sys.executable, "-m", "remediator.cli", "run", "--config", str(config)], old_ref.environment(tree)


class SmallHost:
    """The small synthetic host of bench/exec_churn.py and bench/rename_flood.py."""
    processes, wakeups, service_threads, service_wakeups = 100, 25, 50, 10


def side_by_side_arguments(parser: argparse.ArgumentParser, seconds: float) -> None:
    """The options of a bench that runs small_host_side_by_side."""
    parser.add_argument("--seconds", type=float, default=seconds, help="measured per phase")
    parser.add_argument("--warmup", type=float, default=25.0)
    parser.add_argument("--old-ref", default=None, help="also run that git ref's daemon beside this tree's")


@contextlib.contextmanager
def small_host_side_by_side(bench: str, old_ref_name: str | None, warmup: float, seconds: float, helper_c: str):
    """A SmallHost, the daemon as shipped on it (and `old_ref_name`'s beside it), warmed up for
    `warmup` s, and the bench's helper program compiled from bench/`helper_c`: yields (daemons, the
    helper's path). Everything is stopped and removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix=f"remediator-{Path(bench).stem}-"))
    helper = directory / Path(helper_c).stem
    host = None
    daemons: dict[str, subprocess.Popen] = {}
    try:
        subprocess.run(["gcc", "-O2", "-o", str(helper), str(HERE / helper_c)], check=True)
        host, _services = start_host(SmallHost, directory)
        old_tree = None
        if old_ref_name:
            (directory / "old").mkdir()
            old_tree = old_ref.extract(old_ref_name, directory / "old")
        daemons = start_shipped_daemons(directory, old_tree, old_ref_name, bench)
        time.sleep(warmup)
        print(f"Host: {SmallHost.processes} processes, a {SmallHost.service_threads}-thread service named by comm; "
              f"the daemon as shipped (dry-run, shipped policies), {seconds:g} s per phase")
        yield daemons, helper
    finally:
        stop_daemons(daemons.values())
        if host is not None:
            os.killpg(host.pid, 9)
            host.wait()
        shutil.rmtree(directory, ignore_errors=True)


def start_shipped_daemons(directory: Path, old_tree: Path | None, old_label: str, generated_by: str
                          ) -> dict[str, subprocess.Popen]:
    """The daemon as shipped (dry-run, shipped policies, the service named by comm), this tree's and,
    with `old_tree`, that tree's beside it (under `old_label`): label -> its process."""
    daemons: dict[str, subprocess.Popen] = {}
    trees = {"this tree": None, **({old_label: old_tree} if old_tree is not None else {})}
    for index, (label, tree) in enumerate(trees.items()):
        place = directory / f"daemon-{index}"
        place.mkdir()
        config = place / "remediator.toml"
        config.write_text(daemon_config(place, BY_COMM, generated_by))
        command, env = daemon_command(config, tree)
        daemons[label] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(place / "daemon.log", "w"),
                                          env=env, cwd=str(tree or ROOT))
    return daemons


def daemons_cpu_line(daemons: dict[str, subprocess.Popen], seconds: float, phase: str, old_label: str | None) -> str:
    """Each daemon's CPU over `seconds` from now, side by side, as one line of the phase."""
    hz = os.sysconf("SC_CLK_TCK")
    for label, daemon in daemons.items():
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon ({label}) exited")
    before = {label: cpu_ticks(daemon.pid) for label, daemon in daemons.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    used = {label: 100.0 * (cpu_ticks(daemon.pid) - before[label]) / hz / elapsed for label, daemon in daemons.items()}
    line = f"{phase}: this tree {used['this tree']:.2f}% of one core"
    if old_label is not None:
        old = used[old_label]
        line += f", {old_label} beside it {old:.2f}%: **{used['this tree'] / max(old, 1e-9):.2f}x**"
    return line


def stop_daemons(daemons) -> None:
    """SIGTERM each daemon (it reverts and exits), then wait; one that does not exit in 20 s is killed."""
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def per_cpu_read_ms(cpus: int, rounds: int = 20) -> float:
    """The snapshot's per-CPU work on `cpus` CPUs (wait statistics unpacked and summed by the
    probes' own sum_wait_stats, CPU states unpacked, busy time differenced), on buffers of that
    size: what grows with the CPU count."""
    from remediator.probes import CPU_STATE_HEAD, CpuState, ProbeSettings, sum_wait_stats

    layouts = ProbeSettings(max_cpus=cpus).layouts()
    waits, state = layouts["wait_stats"], struct.Struct(CPU_STATE_HEAD)
    wait_bytes, state_bytes = bytes(waits.size * cpus), bytes(layouts["cpu_state"].size * cpus)
    start = time.thread_time_ns()
    for _ in range(rounds):
        sum_wait_stats([waits.unpack_from(wait_bytes, cpu * waits.size) for cpu in range(cpus)], 0)
        states = [CpuState(*state.unpack_from(state_bytes, cpu * layouts["cpu_state"].size)[:3]) for cpu in range(cpus)]
        [max(0, now.busy_ns - before.busy_ns) for now, before in zip(states, states)]
    return (time.thread_time_ns() - start) / 1e6 / rounds


def model(result: dict, args, cpus: int) -> dict:
    """One tick on `cpus` CPUs: what was measured here, with the per-CPU work of `cpus` CPUs in
    place of this host's; and, for comparison, a full read of every (process, CPU) entry."""
    local_cpus = os.cpu_count() or 2
    per_cpu_here, per_cpu_there = per_cpu_read_ms(local_cpus), per_cpu_read_ms(cpus)
    tick = result["tick_mean_ms"] - per_cpu_here + per_cpu_there
    entries = (args.processes + 1) * cpus
    per_entry_full_ms = result["full_read_ms"] / max(1, result["full_entries"])
    return {
        "cpus": cpus,
        "entries": entries,
        "read": result["changed_mean"],
        "per_cpu_ms": per_cpu_there,
        "tick_ms": tick,
        "full_read_tick_ms": tick - result["per_phase_mean_ms"]["map reads"] + per_entry_full_ms * entries,
    }


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--wakeups", type=int, default=25, help="wakeups per second of each process")
    parser.add_argument("--service-threads", type=int, default=500)
    parser.add_argument("--service-wakeups", type=int, default=10)
    parser.add_argument("--service-processes", type=int, default=1,
                        help="the service's threads shared among this many processes (a pre-forking server)")
    parser.add_argument("--ticks", type=int, default=80)
    parser.add_argument("--warmup", type=float, default=45.0,
                        help="seconds of ticks before measuring (and before the daemon runs are measured)")
    parser.add_argument("--daemon-seconds", type=float, default=65.0,
                        help="then run the daemon as shipped on the same host this long (0: not)")
    parser.add_argument("--daemon-periods", type=int, default=1, metavar="N",
                        help="measure the daemon over N periods of --daemon-seconds one after the other, and print each")
    parser.add_argument("--old-ref", default=None,
                        help="also run that git ref's daemon (its remediator/ and probes/) beside this tree's, at the same time")
    parser.add_argument("--daemon-metrics-port", type=int, default=19447)
    parser.add_argument("--protect-by", default="pid,comm",
                        help="how the daemon runs name the service, one run each: pid, comm (default: both)")
    parser.add_argument("--daemon-profile", type=int, default=0, metavar="N",
                        help="profile the shipped daemon's main thread over --daemon-seconds and print the N "
                             "costliest functions to stderr (its CPU share then includes the profiler's overhead)")
    parser.add_argument("--keep-profile", default=None, metavar="PATH",
                        help="with --daemon-profile, also keep the profile (pstats format) at PATH")
    parser.add_argument("--also-tick-ms", type=float, default=0.0, metavar="MS",
                        help="also run this tree's daemon with this tick beside the others, at the same time (0: not)")
    parser.add_argument("--also-floor-ms", type=float, default=1.0,
                        help="measure the tick again with this report floor, side by side (0: not)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the steady-state ticks and print the N costliest functions to stderr "
                             "(the phase times then include the profiler's overhead)")
    args = parser.parse_args()
    # SIGTERM as Ctrl-C: the synthetic host's 1,000 processes and the daemons are killed on the way out.
    signal.signal(signal.SIGTERM, interrupted)
    if os.geteuid() != 0:
        print("scale: run as root (the probes)", file=sys.stderr)
        return 1
    daemon_settings = probe_settings_for(TICK_S)  # as the daemon loads them
    compared = [daemon_settings]
    if args.also_floor_ms > 0:
        compared.append(dataclasses.replace(daemon_settings, report_floor_ns=int(args.also_floor_ms * 1e6)))
    result, *others = measure(args, compared)
    other = others[0] if others else None
    per_s = 1 / TICK_S
    print(f"Synthetic host: {args.processes} processes waking {args.wakeups}/s, a protected service with "
          f"{result['threads']} threads waking {args.service_wakeups}/s: {result['switches_per_s']:,.0f} context "
          f"switches/s on {os.cpu_count()} CPUs; tick {TICK_S * 1000:g} ms; medians of {result['ticks']} ticks "
          "(thread CPU time)")
    print()
    beside = f" floor {args.also_floor_ms:g} ms beside it: mean |" if other is not None else ""
    print("| phase | ms per tick, median | mean | % of one core (mean) |" + beside)
    print("|---|---|---|---|" + ("---|" if other is not None else ""))
    for name, ms in result["per_phase_ms"].items():
        mean = result["per_phase_mean_ms"][name]
        also = f" {other['per_phase_mean_ms'][name]:.3f} |" if other is not None else ""
        print(f"| {name} | {ms:.3f} | {mean:.3f} | {mean * per_s / 10:.3f} |" + also)
    total, total_mean = result["tick_ms"], result["tick_mean_ms"]
    also = f" {other['tick_mean_ms']:.3f} |" if other is not None else ""
    print(f"| **total** | {total:.3f} | {total_mean:.3f} | **{total_mean * per_s / 10:.2f}** (goal <= {GOAL_PERCENT:g}) |" + also)
    print()
    print(f"proc_cpu: {result['full_entries']} entries, {result['entries']} of them read so far, {result['changed_now']:g} read per tick "
          f"(mean {result['changed_mean']:.1f}) "
          f"(median; the rest ran less than the report floor since last read); "
          f"a full read costs {result['full_read_ms']:.2f} ms ({1000 * result['full_read_ms'] / max(1, result['full_entries']):.2f} us "
          f"per entry). request_cpus auto uncached: {result['uncached_auto_cpus_ms']:.2f} ms per tick "
          f"({result['threads']} threads), cached: 0 between changes of the protected set.")
    print()
    if other is not None:
        print(f"The report floor, side by side: at the daemon's {daemon_settings.report_floor_ns / 1e6:g} ms, "
              f"{result['changed_mean']:.1f} entries read per tick and a tick of {result['tick_mean_ms']:.3f} ms (means); at "
              f"{args.also_floor_ms:g} ms, {other['changed_mean']:.1f} entries and {other['tick_mean_ms']:.3f} ms: "
              f"**{result['tick_mean_ms'] / other['tick_mean_ms']:.2f}x** (map reads + delta "
              f"{(result['per_phase_mean_ms']['map reads'] + result['per_phase_mean_ms']['delta']) / max(1e-9, other['per_phase_mean_ms']['map reads'] + other['per_phase_mean_ms']['delta']):.2f}x).")
        print()
    print("| CPUs | proc_cpu entries (every process on every CPU) | entries read per tick | per-CPU work ms | tick ms (mean) | % of one core | a full read instead: tick ms | % |")
    print("|---|---|---|---|---|---|---|---|")
    for cpus in (os.cpu_count() or 2, 64, 192):
        m = model(result, args, cpus)
        print(f"| {cpus} | {m['entries']} | {m['read']:.1f} | {m['per_cpu_ms']:.2f} | {m['tick_ms']:.2f} | "
              f"{m['tick_ms'] * per_s / 10:.2f} | {m['full_read_tick_ms']:.1f} | {m['full_read_tick_ms'] * per_s / 10:.1f} |")
    old_tree = None
    if args.old_ref and args.daemon_seconds > 0:
        old_tree = old_ref.extract(args.old_ref, Path(tempfile.mkdtemp(prefix="remediator-scale-old-")))
    try:
        for protect_by in (args.protect_by.split(",") if args.daemon_seconds > 0 else []):
            runs = measure_daemon(args, protect_by, old_tree)
            ours = runs["this tree"]
            print()
            print(f"The daemon as shipped (remediator run, dry-run, shipped policies) on the same host, the service "
                  f"protected by {protect_by} ({PROTECT_FORMS[protect_by]}): **{ours['daemon_percent']:.2f}% of one core** "
                  f"over {ours['seconds']:.0f} s after a {args.warmup:g} s warm-up (goal <= {GOAL_PERCENT:g}).")
            if args.daemon_periods > 1:
                for label, run in runs.items():
                    print(f"By period of {args.daemon_seconds:g} s, {label}: "
                          + ", ".join(f"{percent:.2f}%" for percent in run["periods_percent"]))
            if "old" in runs:
                old = runs["old"]["daemon_percent"]
                print(f"{args.old_ref}'s daemon beside it, at the same time: {old:.2f}%; this tree / {args.old_ref}: "
                      f"**{ours['daemon_percent'] / max(old, 1e-9):.2f}x**.")
            if also_tick_label(args) in runs:
                other = runs[also_tick_label(args)]["daemon_percent"]
                print(f"This tree's daemon at a {args.also_tick_ms:g} ms tick beside it, at the same time: {other:.2f}%; "
                      f"against the {TICK_S * 1000:g} ms tick: **{other / max(ours['daemon_percent'], 1e-9):.2f}x**.")
            print("Its threads, % of one core: " + ", ".join(
                f"{tid}: {percent:.2f}" for tid, percent in sorted(ours["threads_percent"].items())))
    finally:
        if old_tree is not None:
            shutil.rmtree(old_tree, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stopped:
        print(f"scale: interrupted ({stopped or 'Ctrl-C'}); its processes are gone", file=sys.stderr)
        sys.exit(130)
