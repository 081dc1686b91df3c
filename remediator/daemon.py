"""`remediator run`: the loop that turns samples and policies into changes, hands-off.

    collector -> engine (pure) -> executor (journal first) -> audit log + journald-friendly log

One tick: take a sample, decide, carry out each decision, re-apply changes to threads born since,
tell systemd we are alive. SIGHUP reloads the config and policies (a bad reload keeps the last good
set and logs every located error); SIGTERM and SIGINT stop, restoring every change first when
`revert_on_exit` says so.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from .audit import AuditLog, AuditWriter, CulpritWriter, Line, MaintainFold, folded_text
from .cgroupfs import CgroupFS, discover_cpu_mount, discover_cpuset_mount, process_cpuset_cpus
from .collector import FULL_RESCAN_S, Collector
from .throttling import ThrottleReader
from .config import DaemonConfig, load_config
from .cpulist import OnlineCpus, format_cpulist, online_cpus
from .burstwatch import BurstWatch
from .engine import (Decision, EngineSettings, EngineState, decide_burst, export_state, forget, given_back, import_state,
                     protected_groups_of, resume)
from .errors import RemediatorError, SetupError
from .executor import Executor
from .health import LOG_WRITE_FAILURES, describe_counts, error_name
from .journal import Journal
from .placement import auto_request_cpus
from .matching import Glob
from .metrics import Metrics, MetricsServer, TextfileWriter
from .model import Outcome, PolicySet
from .policy import PolicyErrors, load_policies
from .probes import BurstEvent, probe_settings_for
from .recording import open_recording
from .printable import printable
from .procfs import ProcessInfo, ProcFS
from .safety import daemon_identity, exclusion_reason
from .sample import SOURCE_PROCFS
from .schedgroups import SchedGroups
from .sdnotify import Notifier
from .selectors import ProtectSelectors
from .sources import PROCFS_DEGRADED, Source, open_source
from .trustedfs import Trust
from .trees import ancestors_read, governing
from .statefile import current_boot_id, load_state, save_state, state_path_for
from .tick import Carried, ExecutorCarrier, Observers, TickReport, carry_out_decisions, engine_settings, run_tick

log = logging.getLogger("remediator")

def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "es" if word.endswith("s") else "s")


SUMMARY_EVERY_S = 30.0
FIRST_SUMMARY_S = 5.0  # a new user sees a judgement of the host within seconds
AUTO_CPUS_REFRESH_S = 5.0
# The engine forgets a process when an outcome says it is gone; one whose step changed nothing
# (unchanged, refused, denied) leaves no journal entry to say so, and is looked for this often.
FORGET_EXITED_EVERY_S = 60.0
# The cyclic collector runs this often, between ticks, instead of on its own: the loop makes no
# cycles (none in 60 s on bench/scale's host), yet the automatic young-generation passes, about one
# a second mid-tick over its large temporary dicts, cost ~7% of the daemon's CPU there. What
# survives a collection is frozen (out of every later pass), and the frozen objects are swept
# too, less often: a cycle of objects frozen while reachable would otherwise never be freed.
COLLECT_CYCLES_EVERY_S = 60.0
SWEEP_FROZEN_EVERY_S = 1800.0
WARN_KINDS = frozenset({"exhausted", "capped", "infeasible", "skipped"})


def shared_comm_warnings(infos: list[ProcessInfo], protect: ProtectSelectors, policies: PolicySet) -> list[str]:
    """Comm globs that match processes of several users: any process can take any comm, so a comm
    alone may name a local user's process as the protected service or as a policy's offender.

    A protect glob is reported when its matches run as more than one uid (with `users`, when some run
    as a uid it does not name: those are refused); a policy glob when its matches run as more than
    one uid and the policy has no `user` to narrow them.
    """
    def uids_matching(glob: Glob) -> list[int]:
        return sorted({info.uid for info in infos if not info.kernel_thread and glob.matches(info.comm)})

    warnings = []
    for text in protect.comms:
        uids = uids_matching(Glob.compile(text))
        strangers = [uid for uid in uids if uid not in protect.users] if protect.users else uids
        if (protect.users and strangers) or (not protect.users and len(uids) > 1):
            advice = (f"those running as uids {', '.join(map(str, strangers))} are not protected (protect.users)"
                      if protect.users else "any of them is protected; give protect.users")
            warnings.append(f"protect.comm '{printable(text)}' matches processes of several users "
                            f"(uids {', '.join(map(str, uids))}): a process can take any comm, and {advice}")
    for policy in policies.policies:
        if policy.match.user:
            continue
        for glob in policy.match.comm:
            uids = uids_matching(glob)
            if len(uids) > 1:
                warnings.append(f"policy {policy.name} ({policy.location}): match.comm '{printable(glob.text)}' matches "
                                f"processes of several users (uids {', '.join(map(str, uids))}): a process can take any "
                                "comm; add match.user to act only on the intended one")
    return warnings


def load_all(config_path: Path, trust: Trust) -> tuple[DaemonConfig, PolicySet]:
    """Config and policies, checked; raises PolicyErrors (located) or RemediatorError."""
    config = load_config(config_path, trust)
    policies = load_policies(config.policy_paths, online_cpus=online_cpus(), trust=trust)
    return config, policies


class Daemon:
    def __init__(
        self,
        config_path: str | Path,
        *,
        mode: str | None = None,
        source: str | None = None,  # overrides the config's [daemon] source
        procfs: ProcFS | None = None,
        notifier: Notifier | None = None,
        max_ticks: int | None = None,
        sleep: Callable[[float], None] | None = None,
        record: str | Path | None = None,  # overrides the config's [recording] path
    ):
        self.config_path = Path(config_path)
        self.record_override = Path(record) if record else None
        self.recorder = None
        self.mode_override = mode
        self.source_override = source
        self.procfs = procfs or ProcFS()
        self.identity = daemon_identity(self.procfs)  # it and what it forks are off limits (safety.py)
        self.notifier = notifier or Notifier()
        self.max_ticks = max_ticks
        self.trust = Trust.for_this_process()  # a root daemon must not act on files others can edit
        self._wake = threading.Event()
        self._sleep = sleep
        self._online_cpus = OnlineCpus()  # asked every tick
        self._stop = False
        self._reload = False
        self.state_write_failures: dict[str, int] = {}
        self.lost_totals: dict[str, int] = {}  # events the probes could not count, since start
        self._saved_state: dict | None = None
        self.metrics_server: MetricsServer | None = None  # [metrics] listen, from run()
        self.textfile: TextfileWriter | None = None  # [metrics] textfile, from run()
        self.boot_id = current_boot_id()
        self.config, self.policies = load_all(self.config_path, self.trust)
        self.cgroupfs = CgroupFS()
        self.cpuset_mount = discover_cpuset_mount(cgroupfs=self.cgroupfs)  # for request_cpus = "auto"
        self.cpu_mount = discover_cpu_mount(cgroupfs=self.cgroupfs)  # for the service's own-quota throttling
        self.mode = self.mode_override or self.config.mode
        self.source_choice = self.source_override or self.config.source
        if self.mode == "live" and os.geteuid() != 0:
            raise RemediatorError("live mode changes other users' processes: run as root (or use --dry-run)")
        for warning in self.config.warnings + tuple(self.policies.warnings):
            log.warning("%s", warning)

    # -- signals --------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def reload(self) -> bool:
        """Load config and policies again; keep the running ones when the new set is bad."""
        try:
            config, policies = load_all(self.config_path, self.trust)
        except PolicyErrors as exc:
            for diagnostic in exc.diagnostics:
                log.error("reload: %s", diagnostic)
            log.error("reload failed: keeping the last good configuration and %d policies", len(self.policies.policies))
            return False
        except RemediatorError as exc:
            log.error("reload failed: %s: keeping the last good configuration", exc)
            return False
        restart_only = ("journal_path", "audit_path", "tick_s", "recording_path", "recording_max_bytes", "metrics") + (() if self.source_override else ("source",))
        for name in restart_only:
            if getattr(config, name) != getattr(self.config, name):
                log.warning("reload: %s changed; it takes effect at the next restart", name.replace("_", " "))
                config = dataclasses.replace(config, **{name: getattr(self.config, name)})
        if config.protect != self.config.protect:
            self.collector.selectors = config.protect
            self.collector.rescan_now()
        if config.mode != self.config.mode:
            if self.mode_override:
                log.warning("reload: mode changed to %s in %s, but the command line says %s: staying %s",
                            config.mode, self.config_path, self.mode_override, self.mode)
            elif not self._switch_mode(config.mode, policies):
                config = dataclasses.replace(config, mode=self.config.mode)
        self.config, self.policies = config, policies
        for warning in config.warnings + tuple(policies.warnings):
            log.warning("%s", warning)
        log.info("reloaded %s: %d policies", self.config_path, len(policies.policies))
        return True

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        config = self.config
        # The source before anything else: a daemon that cannot watch refuses to start, and then it
        # must leave the host as it found it (no audit or journal file, no originals restored).
        source = self._open_source()
        self.collector = Collector(source, config.protect, self.procfs, track_execs=self._has_always_policies(),
                                   sched_groups=SchedGroups.for_host(self.procfs, self.cgroupfs),
                                   throttling=ThrottleReader(self.procfs, self.cgroupfs, self.cpu_mount) if self.cpu_mount else None)
        self.bursts = (BurstWatch(source, self.procfs, self.identity, info_of=self.collector.info,
                                  sketch_of=self.collector.sketch)
                       if BurstWatch.supported(source) else None)
        if self.bursts is not None:
            self.bursts.set_policies(self.policies)
            self.collector.exec_reader = self.bursts.reader
        self.collector.exec_wanted = self._placed_at_exec
        self.collector.recheck_uids = self.policies.matches_user
        self.state = EngineState()
        self.observers = Observers([], on_error=self._observer_failed)
        try:
            self._start_metrics()  # a port it cannot bind stops it before it writes anything
            self.audit = AuditLog(config.audit_path, stamp=self._audit_stamp(source), trust=self.trust)
            self.observers.members[:0] = [AuditWriter(self.audit.write), CulpritWriter(self._culprit_record), DecisionLog()]
            self.recorder = open_recording(self.record_override or config.recording_path, config.recording_max_bytes,
                                           self.trust)
            if self.mode == "live":
                self._enter_live("start-up", self.policies)
            else:
                self.executor = Executor(None, self.procfs, dry_run=True)
            self.collector.start()
            log.info(
                "%s: %d policies, protecting %s (%s), tick %g s, %s, audit %s",
                "dry-run (nothing will be changed)" if self.mode == "dry-run" else "live",
                len(self.policies.policies), config.protect.describe(), self._protected_summary(),
                config.tick_s, self.source_note, config.audit_path,
            )
            discovered = self._survey()
            # What start-up made (modules, the policies, the probes' loader) lives as long as the
            # daemon: out of the cyclic collector's way, its full collection scans ~7,000 objects,
            # not ~44,000, a 20-30 ms pause every minute on bench/scale's host.
            gc.freeze()
            automatic_collection = gc.isenabled()
            gc.disable()  # the loop collects every COLLECT_CYCLES_EVERY_S instead
            self.notifier.ready(f"{self.mode} ({self.source_note}): starting")
            try:
                self._loop(discovered)
            finally:
                if automatic_collection:
                    gc.enable()
        finally:
            self._shutdown()
        return 0

    # -- live mode, its journal and the engine state kept beside it -----------------------------------
    def _enter_live(self, when: str, policies: PolicySet) -> None:
        """Open the journal (raises when another process holds it), settle what an earlier run left
        (on_start), and resume the engine state that run saved, fitted to what is left."""
        journal = Journal(self.config.journal_path, trust=self.trust)
        self.executor = Executor(journal, self.procfs, dry_run=False)
        for outcome in self.executor.reconcile(self.config.on_start):
            self.observers.outcome(when, outcome, self.mode)
        self.state_path = state_path_for(self.config.journal_path)
        self._saved_state = None
        saved, why = load_state(self.state_path, self.boot_id, self.trust)
        if saved is None:
            if why != "none saved":
                log.warning("engine state: %s: ladders and caps start afresh", why)
            return
        try:
            restored = import_state(saved, self.state)
        except ValueError as exc:
            log.warning("engine state: %s: %s: ignored; ladders and caps start afresh", self.state_path, exc)
            return
        identities = {r.identity for r in restored.remediations.values()}
        alive = {identity for identity in identities if self._same_process(identity)}
        still_applied = {entry.identity for entry in self.executor.active()}
        now = time.monotonic()  # engine time: the samples' CLOCK_MONOTONIC
        self.state = resume(restored, now, alive, still_applied, {p.name for p in policies.policies})
        hourly = sum(1 for r in self.state.remediations.values() for t in r.action_times if t > now - 3600)
        log.info("engine state resumed from %s: %s on a ladder (%d with changes in place), %d actions in the last hour",
                 self.state_path, plural(len(self.state.remediations), "process"), len(self.state.active()), hourly)

    def _same_process(self, identity) -> bool:
        try:
            self.procfs.verify(identity)
        except RemediatorError:
            return False
        return True

    def _save_state(self) -> None:
        """Write the engine state when what must survive a restart changed (live mode only: a dry
        run writes nothing next to the journal). A failed write is counted and retried next tick."""
        if self.mode != "live":
            return
        exported = export_state(self.state)
        if exported == self._saved_state:
            return
        try:
            save_state(self.state_path, exported, self.boot_id, self.executor.journal.directory)
        except (OSError, RemediatorError) as exc:
            name = error_name(exc)
            self.state_write_failures[name] = self.state_write_failures.get(name, 0) + 1
            if sum(self.state_write_failures.values()) == 1:
                log.warning("cannot save the engine state to %s: %s (counted in the summary; the daemon goes on)",
                            self.state_path, getattr(exc, "strerror", None) or exc)
            return
        self._saved_state = exported

    def _switch_mode(self, new_mode: str, policies: PolicySet) -> bool:
        """A reload changed `mode`: switch now, or say why not and keep the old one (False).

        live -> dry-run gives every change back first: a dry run changes nothing, and nothing in it
        would ever give them back (nor maintain them on new threads). The engine counts them as given
        back, so their cooldowns start. dry-run -> live opens the journal as a start does (on_start,
        then the engine state saved by the last live run); what the dry run would have done was not
        done, so its ladders and counts are dropped."""
        if new_mode == "dry-run":
            for outcome in self.executor.restore():
                self.observers.outcome("mode-change", outcome, self.mode)
            left = self.executor.active()
            if left:
                log.error("reload: mode live -> dry-run refused: %s could not be given back; staying live so "
                          "they stay journaled and maintained", plural(len(left), "change"))
                return False
            self.state = given_back(self.state, time.monotonic())
            self._save_state()
            self.executor.journal.close()
            self.executor = Executor(None, self.procfs, dry_run=True)
            self.mode = "dry-run"
            log.warning("reload: mode is now dry-run: every change was given back; nothing will be changed")
            return True
        if os.geteuid() != 0:
            log.error("reload: mode dry-run -> live refused: live mode changes other users' processes and needs "
                      "root; staying dry-run")
            return False
        dry_state = self.state
        self.state = dataclasses.replace(self.state, remediations={}, recent_changes=(), recent_placements=(), pending=())
        try:
            self._enter_live("mode-change", policies)
        except RemediatorError as exc:
            self.state = dry_state
            self.executor = Executor(None, self.procfs, dry_run=True)
            log.error("reload: mode dry-run -> live refused: %s; staying dry-run", exc)
            return False
        self.mode = "live"
        log.warning("reload: mode is now live: changes will be made")
        return True

    def _open_source(self) -> Source:
        """The configured source; with "bpf", a SetupError (one line: why, and how to opt into procfs)
        when the probes cannot load, rather than a daemon that looks protective and is not."""
        settings = probe_settings_for(self.config.tick_s)
        try:
            source, fallback = open_source(self.procfs, want=self.source_choice, settings=settings)
        except RemediatorError as exc:  # only with "bpf": "auto" falls back, "procfs" loads no probes
            opt_in = ("--source auto (or procfs)" if self.source_override
                      else f'source = "auto" (or "procfs") in the [daemon] table of {self.config_path}')
            raise SetupError(f"not starting: the eBPF probes cannot load: {exc}; to run without them on procfs "
                             f"(degraded: {PROCFS_DEGRADED}), set {opt_in}") from None
        self.degraded = PROCFS_DEGRADED if source.name == SOURCE_PROCFS else None
        self.source_note = f"source {source.name}" + (f", degraded: {self.degraded}" if self.degraded else "")
        if fallback:
            log.warning('eBPF probes not loaded (%s): source "auto" falls back to procfs, degraded: %s, so only '
                        "policies with always = true can act", fallback, self.degraded)
        elif self.degraded:
            log.warning('source "procfs": degraded: %s, so only policies with always = true can act', self.degraded)
        elif not source.has_task_events:
            log.warning("this kernel has no task:task_rename or cgroup:cgroup_attach_task tracepoint: a process renamed "
                        "or moved to another cgroup without an exec is judged again only at the full rescan, every "
                        "%.0f s", FULL_RESCAN_S)
        return source

    def _start_metrics(self) -> None:
        """The [metrics] table: a metrics observer of the tick, served on loopback and/or written to a
        textfile. A port that cannot be bound stops the start (a fleet would see no daemon at all)."""
        settings = self.config.metrics
        if settings is None or (settings.listen is None and settings.textfile is None):
            return
        metrics = Metrics(settings.offender_labels, own_process=True)
        metrics.set_mode(self.mode)
        self.observers.members.append(metrics)
        if settings.textfile is not None:
            self.textfile = TextfileWriter(metrics, settings.textfile, self.trust)
        if settings.listen is not None:
            try:
                self.metrics_server = MetricsServer(metrics, *settings.listen)
            except OSError as exc:
                raise SetupError(f"not starting: [metrics] listen in {self.config_path}: {exc.strerror or exc}") from None
            log.info("metrics on %s", self.metrics_server.url)

    def _audit_stamp(self, source: Source) -> dict:
        """Fields every audit record carries: which source judged, and what it could not see."""
        return {"source": source.name, **({"degraded": self.degraded} if self.degraded else {})}

    def _survey(self) -> list[ProcessInfo]:
        """One pass over the running processes: say which the policies govern and which they may not
        touch, and return those an always-policy places (at start and after a reload)."""
        governed: dict[str, list[str]] = {}
        excluded: list[str] = []
        placed: list[ProcessInfo] = []
        protected = set(self.collector.protected)
        infos = list(self.procfs.iter_processes())
        for warning in shared_comm_warnings(infos, self.config.protect, self.policies):
            log.warning("%s", warning)
        processes = {info.pid: info for info in infos}
        for info in infos:
            found = governing(info, processes, self.policies)
            if found is None:
                continue
            policy = found.policy
            if policy.trigger.always:
                placed.append(info)  # the engine applies the safety rules (and audits an exclusion)
            reason = exclusion_reason(info, protected, processes=processes, daemon=self.identity)
            if reason:
                excluded.append(f"{info.comm} ({info.pid}, {policy.name}): {reason}")
                continue
            governed.setdefault(policy.name, []).append(f"{info.comm} ({info.pid})")
        if not governed:
            log.info("no running process is named by a policy yet")
        for name, processes in sorted(governed.items()):
            shown = ", ".join(processes[:8]) + (f" and {len(processes) - 8} more" if len(processes) > 8 else "")
            log.info("policy %s governs %s", name, shown)
        for line in excluded:
            log.info("off limits although a policy names it: %s", line)
        return placed

    def _has_always_policies(self) -> bool:
        return any(policy.trigger.always for policy in self.policies.policies)

    def _placed_at_exec(self, sketch: ProcessInfo) -> bool:
        """Whether an `always` policy may govern an exec'd process, judged from its sketch: only
        those are read in full and named in the sample for placement at exec, not every process
        a build or a script execs. Where a sketch cannot tell (a policy names a cgroup, unit or
        user), every one is."""
        if not self.policies.judged_by_sketch:
            return True
        # Its parents (long-lived, so cached) only where a tree policy could govern it through them.
        known = ancestors_read(sketch, self.collector.sketch) if self.policies.covers_descendants else {}
        governed = governing(sketch, {**known, sketch.pid: sketch}, self.policies)
        return governed is not None and governed.policy.trigger.always

    def _protected_summary(self) -> str:
        pids = sorted(self.collector.protected)
        if not pids:
            return "none running yet"
        threads = sum(len(tids) for tids in self.collector.protected.values())
        return f"{plural(len(pids), 'process')}, {plural(threads, 'thread')}"

    def _loop(self, discovered: list[ProcessInfo]) -> None:
        ticks = 0
        if self.bursts is not None:  # bursts are decided from the start, before the first tick
            self._settings = self._engine_settings()
            self.bursts.refresh(discovered, self.collector.protected)
        next_tick = time.monotonic()
        last_summary = time.monotonic() - SUMMARY_EVERY_S + FIRST_SUMMARY_S
        last_collection = last_sweep = time.monotonic()
        while not self._stop:
            next_tick += self.config.tick_s
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._wait(delay)
            else:
                next_tick = time.monotonic()  # fell behind: do not try to catch up in a burst
            if self._stop:
                break
            if self._reload:
                self._reload = False
                if self.reload():
                    discovered = self._survey()
                    if self.bursts is not None:
                        self.bursts.set_policies(self.policies)
                        self.collector.exec_reader = self.bursts.reader
                    self.collector.track_execs = self._has_always_policies()
                    self.collector.recheck_uids = self.policies.matches_user
            self.tick(discovered)
            discovered = []
            ticks += 1
            now = time.monotonic()
            if now - last_summary >= SUMMARY_EVERY_S:
                last_summary = now
                self._log_summary()
            if now - last_collection >= COLLECT_CYCLES_EVERY_S:
                last_collection = now
                sweep = now - last_sweep >= SWEEP_FROZEN_EVERY_S
                if sweep:
                    last_sweep = now
                    gc.unfreeze()
                gc.collect()
                gc.freeze()
            if self.max_ticks is not None and ticks >= self.max_ticks:
                break

    def _wait(self, delay: float) -> None:
        """Sleep until the next tick, pinging the watchdog on time however long the tick is: in
        steps of half the ping interval, so two pings are never more than 3/4 of WatchdogSec apart."""
        interval = self.notifier.watchdog_interval
        steps = 1 if not interval else max(1, math.ceil(delay / (interval / 2)))
        for _ in range(steps):
            if self._sleep:
                self._sleep(delay / steps)
            elif self.bursts is not None and self.bursts.active:
                if self._wait_for_bursts(delay / steps):
                    return  # a signal: stop or reload now
            elif self._wake.wait(delay / steps):
                self._wake.clear()
                return  # a signal: stop or reload now
            self.notifier.watchdog()

    def _wait_for_bursts(self, duration: float) -> bool:
        """Wait on the probe's ring buffer instead of sleeping: a burst event is decided at once
        (decide_burst), off the tick. True when a signal asks to stop or reload."""
        deadline = time.monotonic() + duration
        while not (self._stop or self._reload):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for event in self.bursts.wait(min(remaining, 1.0)):
                self._on_burst(event)
        self._wake.clear()
        return True

    def _on_burst(self, event: BurstEvent) -> None:
        received_ns = time.monotonic_ns()
        found = self.bursts.evidence(event)
        if found is None:
            return
        judged_ns = time.monotonic_ns()
        info, burst = found
        protected = tuple(sorted(self.collector.protected))
        sample = getattr(self, "last_sample", None)
        groups = protected_groups_of(sample) if sample is not None else []
        self.state, decisions = decide_burst(self.state, info, burst, self.policies, self._settings, protected, groups,
                                             time.monotonic(), time.time(), self.bursts.ancestors_of(info))
        self.state, _carried = carry_out_decisions(self.state, decisions, ExecutorCarrier(self.executor, self.mode), self.policies,
                                                   protected, self.observers, self._checkpoint)
        if decisions:
            self._save_state()
            # Where detection time goes (bench/incident.py's detection run reads these with -v).
            log.debug("burst of pid %d: event read %.1f ms after the counted wait, judged in %.1f ms, decided and "
                      "carried out in %.1f ms", event.tgid, (received_ns - event.mono_ns) / 1e6,
                      (judged_ns - received_ns) / 1e6, (time.monotonic_ns() - judged_ns) / 1e6)

    def tick(self, discovered: list[ProcessInfo] = ()) -> list[Decision]:
        sample = self.collector.sample()
        self.last_sample = sample
        if self.recorder is not None:
            self.recorder.write(sample)  # the rolling recording: the input of report, replay, policy suggest
        for name, count in sample.lost.items():
            self.lost_totals[name] = self.lost_totals.get(name, 0) + count
        settings = self._settings = self._engine_settings()  # kept for burst decisions until the next tick
        self._keep_off(settings.request_cpus, settings.online_cpus)
        self.state, report = run_tick(self.state, sample, self.policies, settings, ExecutorCarrier(self.executor, self.mode),
                                      self.observers, discovered=discovered, checkpoint=self._checkpoint,
                                      clock=time.monotonic)
        self._forget_exited()
        if self.bursts is not None:
            self.bursts.refresh(list(discovered) + list(sample.processes.values()), sample.protected.pids,
                                changed=self.collector.changed)
        self._save_state()
        if self.textfile is not None and self.textfile.maybe_write(time.monotonic()) is False \
                and sum(self.textfile.failures.values()) == 1:
            log.warning("cannot write the metrics textfile: %s (counted in the summary; the daemon goes on)",
                        self.textfile.last_failure)
        self.notifier.watchdog()
        if self.notifier.status_due():
            self.notifier.status(self._status_line(sample))
        return [carried.decision for carried in report.carried]

    def _forget_exited(self) -> None:
        """Drop the ladders of processes that exited (or whose pid was reused) without an outcome
        saying so: the state, and the file it is saved to, stay bounded by the live processes."""
        now = time.monotonic()
        if now - getattr(self, "_exited_checked_at", float("-inf")) < FORGET_EXITED_EVERY_S:
            return
        self._exited_checked_at = now
        for identity in {remediation.identity for remediation in self.state.remediations.values()}:
            if not self._same_process(identity):
                self.state = forget(self.state, identity)

    def _checkpoint(self, state: EngineState) -> None:
        self.state = state
        self._save_state()

    def _observer_failed(self, observer, exc: Exception) -> None:
        log.exception("%s failed (the daemon goes on): %s", type(observer).__name__, exc)

    def _culprit_record(self, record: dict) -> None:
        """An unnamed culprit or a self-inflicted tail goes on record (bounded: see culprits.py)."""
        self.audit.write(record)
        log.info("%s: %s", record["event"], printable(record["message"]))

    def _engine_settings(self) -> EngineSettings:
        online = self._online_cpus()
        if self.config.request_cpus is not None:
            request = self.config.request_cpus
        else:
            request = self._auto_request_cpus(online)
        # Built again only when an input changed (a reload, hotplug, "auto" moving): once a tick otherwise.
        key = (self.policies, self.config, request, online)
        cached = getattr(self, "_settings_for", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1] or cached[0][2:] != key[2:]:
            cached = self._settings_for = (key, engine_settings(self.policies, self.config.tick_s, request, online,
                                                                self.config.max_changes_per_minute, os.getpid(),
                                                                self.identity.start_time if self.identity else None))
        return cached[1]

    def _auto_request_cpus(self, online: frozenset[int]) -> frozenset[int]:
        """request_cpus = "auto", read again when the protected set or the online CPUs changed, and
        at least every AUTO_CPUS_REFRESH_S (a thread may change its own affinity): not one
        sched_getaffinity per protected thread per tick, which grows with the service's threads."""
        key = (online, frozenset((pid, len(tids)) for pid, tids in self.collector.protected.items()))
        cached = getattr(self, "_auto_cpus", None)
        now = time.monotonic()
        if cached is None or cached[0] != key or now - cached[1] >= AUTO_CPUS_REFRESH_S:
            cached = self._auto_cpus = (key, now, auto_request_cpus(self.collector.protected, online, self._cgroup_cpus))
        return cached[2]

    def _cgroup_cpus(self, pid: int) -> frozenset[int] | None:
        """The CPUs a protected process's cpuset cgroup allows (None: gone, or no cpuset hierarchy)."""
        try:
            return process_cpuset_cpus(self.cgroupfs, self.cpuset_mount, self.procfs.cgroups(pid))
        except RemediatorError:
            return None

    def _keep_off(self, request: frozenset[int], online: frozenset[int]) -> None:
        """Keep the daemon itself off the CPUs it protects: it is a neighbour too."""
        target = online - request
        if not request or not target or target == getattr(self, "_own_cpus", None):
            return
        try:
            for tid in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(tid), target)
        except OSError as exc:
            log.warning("could not move remediator off the request CPUs: %s", exc.strerror)
            return
        self._own_cpus = target
        log.info("remediator runs on CPUs %s, off the request CPUs %s", format_cpulist(target), format_cpulist(request))

    def _status_line(self, sample) -> str:
        p99 = sample.protected.percentile_ns(99)
        tail = "n/a" if p99 is None else f"{p99 / 1000:.0f} us"
        problems = self._problems()
        return (f"{self.mode} ({self.source_note}): protected p99 {tail}, {len(self.state.active())} active remediations"
                + (f"; {problems}" if problems else ""))

    def _problems(self) -> str:
        """What failed and was carried on from: failed writes by kind, threads the protected map
        could not hold, /proc reads that would have blocked. "" when nothing did."""
        parts = []
        failed = {"audit": getattr(getattr(self, "audit", None), "failures", {}), "state": self.state_write_failures,
                  "log": LOG_WRITE_FAILURES, "recording": self.recorder.failures if self.recorder else {},
                  "metrics textfile": self.textfile.failures if self.textfile else {}}
        writes = [f"{kind} {describe_counts(counts)}" for kind, counts in failed.items() if counts]
        if writes:
            parts.append("failed writes: " + ", ".join(writes))
        collector = getattr(self, "collector", None)
        untracked = collector.untracked_threads() if collector is not None else 0
        if untracked:
            parts.append(f"protected map full: {plural(untracked, 'thread')} not tracked")
        bursts = getattr(self, "bursts", None)
        if bursts is not None and bursts.left_out:
            parts.append(f"burst candidate map full: {plural(bursts.left_out, 'process')} left to the tick")
        if self.lost_totals:
            parts.append("probe events lost: " + ", ".join(f"{name} {count}" for name, count in sorted(self.lost_totals.items())))
        blocked = self.procfs.blocked_reads
        if blocked:
            parts.append(f"/proc reads timed out: {blocked} (cmdline of a blocked process)")
        return "; ".join(parts)

    # -- logs ---------------------------------------------------------------------------------
    def _log_summary(self) -> None:
        sample = getattr(self, "last_sample", None)
        if sample is None:
            return
        waits = sample.protected
        if not waits.pids:
            problems = self._problems()
            log.info("nothing protected is running (%s); watching for it. Name your service in the [protect] "
                     "table of %s (see 'remediator watch --comm NAME' to try a selector); to see remediator work on "
                     "this host in a minute, run 'sudo ./bootstrap demo' (or 'remediator demo'); %s%s",
                     self.config.protect.describe(), self.config_path, self.source_note, f"; {problems}" if problems else "")
            return
        p99 = waits.percentile_ns(99)
        top = []
        for pid, ns in sample.blame[:3]:
            info = sample.processes.get(pid)
            name = info.comm if info else str(pid)
            found = governing(info, sample.processes, self.policies) if info else None
            excluded = exclusion_reason(info, waits.pids, processes=sample.processes, daemon=self.identity) if info else None
            note = excluded or (f"policy {found.policy.name}" if found else "no policy")
            top.append(f"{name} ({pid}) {sample.blame_share(pid):.0%} [{note}]")
        active = self.state.active()
        problems = self._problems()
        log.info(
            "protected %s, %s; p99 %s; most blamed: %s; %s; request CPUs %s; %s%s",
            plural(len(waits.pids), "process"), plural(waits.threads, "thread"),
            "n/a" if p99 is None else f"{p99 / 1000:.0f} us",
            ", ".join(top) or ("unknown" if self.degraded else "nobody"),
            plural(len(active), "active remediation"),
            format_cpulist(self.config.request_cpus) if self.config.request_cpus is not None else "auto",
            self.source_note,
            f"; {problems}" if problems else "",
        )

    def _shutdown(self) -> None:
        self.notifier.stopping()
        try:
            if self.mode == "live" and self.config.revert_on_exit and hasattr(self, "executor"):
                for outcome in self.executor.restore():
                    self.observers.outcome("exit", outcome, self.mode)
                if hasattr(self, "state_path"):
                    self.state = given_back(self.state, time.monotonic())
                    self._save_state()
        finally:
            if getattr(self, "textfile", None) is not None:
                self.textfile.write()  # the exit's restores too
            if getattr(self, "metrics_server", None) is not None:
                self.metrics_server.close()
            if hasattr(self, "collector"):
                self.collector.close()
            if hasattr(self, "executor") and self.executor.journal is not None:
                self.executor.journal.close()
            if hasattr(self, "audit"):
                self.audit.close()
            if self.recorder is not None:
                self.recorder.close()
            self._online_cpus.close()
            self.notifier.close()


class DecisionLog:
    """The tick's observer for the daemon's log (journald): one line per decision and per change
    (maintain outcomes folded as in the audit log, audit.MaintainFold)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.fold = MaintainFold(clock)

    def on_decision(self, carried: Carried) -> None:
        decision, outcome = carried.decision, carried.outcome
        who = f"pid {decision.info.pid} ({decision.info.comm})"
        policy = f"policy {decision.policy.name} ({decision.policy.location})" if decision.policy else "no policy"
        if decision.kind == "act":
            verb = "would change" if outcome and outcome.status == "would-apply" else outcome.status if outcome else "?"
            level = logging.WARNING if outcome and outcome.is_error else logging.INFO
            log.log(level, "%s %s by %s, %s: %s [%s]", verb, who, policy, decision.message,
                    outcome.message if outcome else "", decision.evidence.get("reason", decision.evidence.get("trigger", "")))
        elif decision.kind == "revert":
            log.info("revert %s by %s: %s: %s", who, policy, decision.message, outcome.message if outcome else "")
        elif decision.kind in WARN_KINDS:
            log.warning("%s %s by %s: %s", decision.kind, who, policy, decision.message)
        elif decision.kind == "verify" and carried.mode != "live":
            log.info("verify %s by %s: %s (%s: nothing was changed, so this only compares the periods before and "
                     "after)", who, policy, decision.message, carried.mode)
        else:
            log.info("%s %s by %s: %s", decision.kind, who, policy, decision.message)

    def on_outcome(self, when: str, outcome: Outcome, mode: str) -> None:
        self._log(self.fold.outcome(when, outcome, mode))

    def on_tick(self, report: TickReport) -> None:
        self._log(self.fold.tick())

    @staticmethod
    def _log(lines: list[Line]) -> None:
        for when, outcome, _mode, folded in lines:
            log.log(logging.WARNING if outcome.is_error else logging.INFO, "%s: %s%s", when, outcome, folded_text(folded))
