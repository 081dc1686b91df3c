"""The daemon keeps running through what would otherwise stop or churn it (issue 11, "Keep running").

- an audit write on a full file system (a real tmpfs, filled) is counted and reported, not fatal;
- a restart resumes the engine state saved beside the journal, so a crash loop cannot re-apply
  past a policy's hourly cap;
- a reload that changes `mode` takes effect (or is refused, saying why);
- the watchdog is pinged on time however long the tick.

The daemons here run in the test process on the procfs source (no probes: nothing here is about
samples) with a no-op sleep, so a tick follows the next at once.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import weakref
from pathlib import Path

import pytest

from helpers.daemon import wait_until, write_config
from helpers.remediation import identity_of, thread_nices
from remediator import daemon as daemon_module
from remediator.audit import AuditLog, read_audit
from remediator.daemon import Daemon
from remediator.engine import EngineState, Remediation
from remediator.journal import Journal
from remediator.procfs import ProcessIdentity
from remediator.sdnotify import Notifier
from remediator.statefile import state_path_for

PLACE = """
[[policy]]
name = "test-placed"
description = "an always-policy: acts without a tail, so the procfs source will do"
[policy.match]
comm = ["placed-sleeper"]
[policy.trigger]
always = true
[[policy.actions]]
nice = 10
[policy.limits]
max_actions_per_hour = {hourly}
"""


class RecordingNotifier(Notifier):
    """sd_notify messages kept in a list, with the (fake) clock at which each was sent."""

    def __init__(self, watchdog_usec: int | None = None, clock=None):
        environ = {"WATCHDOG_USEC": str(watchdog_usec)} if watchdog_usec else {}
        super().__init__(environ, status_every_s=0.0, **({"clock": clock} if clock else {}))  # a STATUS every tick
        self.sent: list[tuple[float, str]] = []

    @property
    def enabled(self) -> bool:
        return True

    def notify(self, message: str) -> None:
        self.sent.append((self.clock(), message))


@pytest.fixture
def placed(spawn, tmp_path):
    """A sleeper named placed-sleeper (what PLACE names), and a victim to protect."""
    sleeper = tmp_path / "placed-sleeper"
    shutil.copy("/bin/sleep", sleeper)
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    target = spawn(["sh", "-c", f"echo ready; exec {sleeper} 600"])
    return victim, target


def config_for(tmp_path: Path, victim_pid: int, *, hourly: int = 6, **kwargs) -> Path:
    return write_config(tmp_path, [victim_pid], source="procfs", policy_text=PLACE.format(hourly=hourly), **kwargs)


# -- a full file system -----------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs, unmounted at teardown even when the test fails."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # a file still open: detach now


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses with ENOSPC; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"x" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.mark.root
def test_an_audit_write_on_a_full_disk_is_counted_and_leaves_whole_lines(small_fs):
    audit = AuditLog(small_fs / "audit.jsonl")
    assert audit.write({"decision": "act", "n": 0})
    filler = fill(small_fs)
    results = [audit.write({"decision": "act", "n": n, "pad": "y" * 300}) for n in range(1, 40)]
    assert not all(results)  # the page the first line started fills up, then every write fails
    failed = results.count(False)
    assert audit.failures == {"ENOSPC": failed}
    assert "No space left on device" in audit.last_failure
    lines = (small_fs / "audit.jsonl").read_text().splitlines()
    assert [record["n"] for record in read_audit(small_fs / "audit.jsonl")] == list(range(len(lines)))  # no torn line
    filler.unlink()
    assert audit.write({"decision": "act", "n": "after"})  # room again: writes resume
    assert list(read_audit(small_fs / "audit.jsonl"))[-1]["n"] == "after"
    audit.close()


@pytest.mark.root
def test_the_daemon_keeps_ticking_with_its_audit_log_on_a_full_disk(placed, small_fs, tmp_path, caplog):
    victim, target = placed
    config = config_for(tmp_path, victim.pid, mode="dry-run")
    config.write_text(config.read_text().replace(f'audit_log = "{tmp_path}/audit.jsonl"', f'audit_log = "{small_fs}/audit.jsonl"'))
    fill(small_fs)
    notifier = RecordingNotifier()
    daemon = Daemon(config, notifier=notifier, max_ticks=5, sleep=lambda _s: None)
    with caplog.at_level(logging.INFO, logger="remediator"):
        assert daemon.run() == 0
        daemon._log_summary()
    assert daemon.audit.failures.get("ENOSPC", 0) >= 1  # the placement's "act" (and more) could not be written
    assert (small_fs / "audit.jsonl").read_bytes() == b""
    statuses = [message for _, message in notifier.sent if message.startswith("STATUS=") and "protected p99" in message]
    assert len(statuses) == 5  # every tick ran
    assert "failed writes: audit " in statuses[-1] and "ENOSPC" in statuses[-1]
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("protected 1 process")]
    assert summary and "failed writes: audit" in summary[-1]


def test_a_log_write_that_fails_is_counted_not_raised(monkeypatch):
    from remediator.health import LOG_WRITE_FAILURES, CountingStreamHandler

    class FullDisk:
        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr(logging, "raiseExceptions", True)  # the default, which would print a traceback
    before = LOG_WRITE_FAILURES.get("ENOSPC", 0)
    logger = logging.getLogger("remediator.test-full-disk")
    logger.propagate = False
    handler = CountingStreamHandler(FullDisk())
    logger.addHandler(handler)
    try:
        logger.warning("one")
        logger.warning("two")
    finally:
        logger.removeHandler(handler)
    assert LOG_WRITE_FAILURES["ENOSPC"] == before + 2


# -- restarts ----------------------------------------------------------------------------------------
# A daemon in the test process would find the sleeper to be its own child (off limits): these run
# `remediator run` as a process of its own.

@pytest.mark.root
def test_a_crash_loop_does_not_apply_past_the_hourly_cap(placed, tmp_path, daemon):
    """hourly = 2, on_start = "restore", and three daemons one after the other, each killed with its
    change in place (a crash): the first two place the sleeper (the second start restores the first
    change, then places again), the third finds the cap reached and leaves the sleeper alone."""
    victim, target = placed
    config = config_for(tmp_path, victim.pid, hourly=2, on_start="restore", revert_on_exit=False)
    def decided(process, kind):
        return [r for r in process.audit() if r["decision"] == kind and r["process"]["pid"] == target.pid]

    for run in range(3):
        process = daemon(config)
        if run < 2:
            wait_until(lambda: len(decided(process, "act")) == run + 1, 30.0, what=f"the placement of run {run + 1}")
            assert set(thread_nices(target.pid).values()) == {10}
        else:
            wait_until(lambda: decided(process, "capped"), 30.0, what="the cap")
        process.kill()  # SIGKILL: no clean exit, as a crash
    assert set(thread_nices(target.pid).values()) == {0}  # the third start restored, and did not place again
    mine = [r for r in process.audit() if r.get("process", {}).get("pid") == target.pid]
    assert [r["decision"] for r in mine if r["decision"] in ("act", "capped")] == ["act", "act", "capped"]
    assert [r["outcome"] for r in mine if r["decision"] == "act"] == ["applied", "applied"]
    assert len({r["action_id"] for r in mine if r["decision"] == "act"}) == 2  # ids stay unique across runs
    saved = json.loads(state_path_for(tmp_path / "journal.jsonl").read_text())
    assert saved["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.root
def test_state_from_another_boot_is_ignored(placed, tmp_path, daemon):
    victim, target = placed
    config = config_for(tmp_path, victim.pid, hourly=1, on_start="restore", revert_on_exit=False)
    first = daemon(config)
    wait_until(lambda: [r for r in first.audit() if r["decision"] == "act"], 30.0, what="the placement")
    first.kill()
    path = state_path_for(tmp_path / "journal.jsonl")
    saved = json.loads(path.read_text())
    assert saved["engine"]["remediations"]
    path.write_text(json.dumps({**saved, "boot_id": "another-boot"}))
    second = daemon(config, "--ticks", "4")
    assert second.proc.wait(timeout=60) == 0
    assert "saved before the last boot" in second.log()
    assert set(thread_nices(target.pid).values()) == {10}  # the count started afresh: placed again, not capped
    assert not [r for r in second.audit() if r["decision"] == "capped"]


@pytest.mark.root
def test_a_state_file_that_cannot_be_written_is_counted_not_fatal(tmp_path, spawn, monkeypatch):
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    config = config_for(tmp_path, victim.pid, revert_on_exit=False)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(daemon_module, "save_state", full)
    notifier = RecordingNotifier()
    process = Daemon(config, notifier=notifier, max_ticks=3, sleep=lambda _s: None)
    assert process.run() == 0
    assert process.state_write_failures == {"ENOSPC": 3}  # tried each tick, never raised
    statuses = [m for _, m in notifier.sent if m.startswith("STATUS=") and "protected p99" in m]
    assert len(statuses) == 3 and "failed writes: state 3 (ENOSPC 3)" in statuses[-1]


def test_the_ladders_of_processes_that_exited_are_forgotten(tmp_path, spawn, monkeypatch):
    """A step that changed nothing (unchanged, refused, denied) leaves no journal entry, so no
    outcome ever says its process left: the daemon looks for such processes itself, or a user
    exec'ing pre-niced copies of what an always-policy names would grow the state (and the file it
    is saved to) without end. Looked for once a minute; a pid reused by another process counts as gone."""
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    alive = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    exited = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    alive_identity, exited_identity = identity_of(alive.pid), identity_of(exited.pid)
    reused_identity = ProcessIdentity(alive.pid, alive_identity.start_time - 1)
    exited.kill()
    process = Daemon(config_for(tmp_path, victim.pid), notifier=RecordingNotifier(), max_ticks=1, sleep=lambda _s: None)

    def ladders(*identities):
        return EngineState(remediations={(i, "test-placed"): Remediation(i, "test-placed", step_index=0, applied=True)
                                         for i in identities})

    process.state = ladders(alive_identity, exited_identity, reused_identity)
    process._forget_exited()
    assert [identity for identity, _ in process.state.remediations] == [alive_identity]
    process.state = ladders(alive_identity, exited_identity)
    process._forget_exited()  # within the minute: not looked for again yet
    assert len(process.state.remediations) == 2
    monkeypatch.setattr(daemon_module, "FORGET_EXITED_EVERY_S", 0.0)
    process._forget_exited()
    assert [identity for identity, _ in process.state.remediations] == [alive_identity]


def test_the_loop_collects_cycles_itself_between_ticks_and_gives_the_collector_back(tmp_path, spawn, monkeypatch):
    """Automatic collection is off while the loop runs (its passes came mid-tick, about once a
    second on a busy host); the loop collects between ticks instead, so a cycle made during one
    tick is gone by the next when a collection is due each tick, and the collector is given back."""
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    monkeypatch.setattr(daemon_module, "COLLECT_CYCLES_EVERY_S", 0.0)

    class Node:
        pass

    enabled, cycles, freed = [], [], []

    def sleep(_seconds):
        enabled.append(gc.isenabled())
        freed.append([cycle() is None for cycle in cycles])
        node = Node()
        node.itself = node  # unreachable once this returns: only the cyclic collector frees it
        cycles.append(weakref.ref(node))

    assert gc.isenabled()
    assert Daemon(config_for(tmp_path, victim.pid), notifier=RecordingNotifier(), max_ticks=3, sleep=sleep).run() == 0
    assert enabled == [False, False, False]
    assert freed == [[], [True], [True, True]]
    assert gc.isenabled()


# -- reloads that change the mode ----------------------------------------------------------------------

def set_mode(config: Path, mode: str) -> None:
    text = config.read_text()
    config.write_text(text.replace('mode = "live"', f'mode = "{mode}"').replace('mode = "dry-run"', f'mode = "{mode}"'))


@pytest.mark.root
def test_a_reload_switches_live_to_dry_run_and_back(placed, tmp_path, daemon):
    victim, target = placed
    config = config_for(tmp_path, victim.pid, mode="live", revert_on_exit=True)
    process = daemon(config)
    wait_until(lambda: set(thread_nices(target.pid).values()) == {10}, 30.0, what="the placement")

    set_mode(config, "dry-run")
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: mode is now dry-run" in process.log(), 30.0, what="the switch to dry-run")
    assert set(thread_nices(target.pid).values()) == {0}  # given back before the switch
    wait_until(lambda: [r for r in process.audit() if r["decision"] == "act" and r["mode"] == "dry-run"], 30.0,
               what="a dry-run decision")
    assert set(thread_nices(target.pid).values()) == {0}  # described, not done
    Journal(tmp_path / "journal.jsonl").close()  # the dry run let go of the journal: it can be locked

    set_mode(config, "live")
    process.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: mode is now live" in process.log(), 30.0, what="the switch to live")
    wait_until(lambda: set(thread_nices(target.pid).values()) == {10}, 30.0, what="the placement, live again")
    assert process.stop() == 0
    assert set(thread_nices(target.pid).values()) == {0}  # revert_on_exit
    records = process.audit()
    assert [r["mode"] for r in records if r["decision"] == "act" and r["process"]["pid"] == target.pid][:1] == ["live"]
    assert any(r["decision"] == "mode-change" and r["outcome"] == "restored" for r in records)


def reload_with(config: Path, mode: str, daemon_box: list, before_reload=None):
    """An in-process daemon's sleep that, at its first call, sets `mode` in the config and asks for
    a reload (as SIGHUP does)."""
    calls = [0]

    def sleep(_seconds: float) -> None:
        calls[0] += 1
        if calls[0] == 1:
            set_mode(config, mode)
            if before_reload:
                before_reload()
            daemon_box[0]._reload = True

    return sleep


@pytest.mark.root
def test_a_mode_change_is_refused_with_a_message_when_it_cannot_be_made(tmp_path, spawn, caplog, monkeypatch):
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    config = config_for(tmp_path, victim.pid, mode="dry-run")
    box: list = [None]
    # Not root at the reload: dry-run -> live is refused and the daemon stays in dry-run.
    box[0] = daemon = Daemon(config, notifier=RecordingNotifier(), max_ticks=2, sleep=reload_with(
        config, "live", box, before_reload=lambda: monkeypatch.setattr(os, "geteuid", lambda: 1000)))
    with caplog.at_level(logging.INFO, logger="remediator"):
        assert daemon.run() == 0
    monkeypatch.undo()
    assert daemon.mode == "dry-run" and daemon.config.mode == "dry-run" and daemon.executor.dry_run
    assert any("mode dry-run -> live refused" in r.getMessage() and "needs root; staying dry-run" in r.getMessage()
               for r in caplog.records)

    # Another process holds the journal: refused too, saying why.
    set_mode(config, "dry-run")
    caplog.clear()
    with Journal(tmp_path / "journal.jsonl"):
        box[0] = daemon = Daemon(config, notifier=RecordingNotifier(), max_ticks=2, sleep=reload_with(config, "live", box))
        with caplog.at_level(logging.INFO, logger="remediator"):
            assert daemon.run() == 0
    assert daemon.mode == "dry-run" and daemon.executor.dry_run
    assert any("refused" in r.getMessage() and "in use by another remediator" in r.getMessage() for r in caplog.records)


def test_the_command_line_mode_wins_over_a_reloaded_config(tmp_path, spawn, caplog):
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    config = config_for(tmp_path, victim.pid, mode="dry-run")
    box: list = [None]
    box[0] = daemon = Daemon(config, mode="dry-run", notifier=RecordingNotifier(), max_ticks=2,
                             sleep=reload_with(config, "live", box))
    with caplog.at_level(logging.INFO, logger="remediator"):
        assert daemon.run() == 0
    assert daemon.mode == "dry-run" and daemon.executor.dry_run
    assert any("the command line says dry-run: staying dry-run" in r.getMessage() for r in caplog.records)


# -- the watchdog --------------------------------------------------------------------------------------

def test_the_watchdog_is_pinged_on_time_through_a_long_tick(tmp_path, spawn):
    """WatchdogSec = 2 s and a 60 s tick: pings come at least every 1.5 s of the (fake) clock."""
    victim = spawn(["sh", "-c", "echo ready; exec sleep 600"])
    config = write_config(tmp_path, [victim.pid], mode="dry-run", source="procfs")
    config.write_text(config.read_text().replace('tick = "250ms"', 'tick = "60s"'))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    notifier = RecordingNotifier(watchdog_usec=2_000_000, clock=lambda: now[0])
    assert Daemon(config, notifier=notifier, max_ticks=2, sleep=sleep).run() == 0
    pings = [at for at, message in notifier.sent if message == "WATCHDOG=1"]
    assert now[0] >= 110  # two ticks of ~60 s went by on the fake clock
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 70 and max(gaps) <= 1.5, gaps


def test_a_status_goes_out_at_most_once_a_second_and_only_when_someone_listens(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    now = [100.0]
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}, clock=lambda: now[0])
    try:
        assert notifier.status_due()  # the first at once
        now[0] += 0.25
        assert not notifier.status_due()  # a tick later: not yet
        now[0] += 0.75
        assert notifier.status_due()
        assert not Notifier({}).status_due()  # not under systemd: no line is built at all
    finally:
        notifier.close()
        listener.close()
