"""The daemon's engine settings are built once and kept while their inputs stay (they were built
again on every tick): a reload, a CPU going offline or another request set builds them again."""

from __future__ import annotations

from helpers.daemon import write_config
from remediator.cpulist import OnlineCpus
from remediator.daemon import Daemon
from remediator.tick import engine_settings


def test_engine_settings_are_kept_until_an_input_changes(tmp_path, monkeypatch):
    daemon = Daemon(write_config(tmp_path, [1], mode="dry-run"))
    online = {"cpus": frozenset({0, 1})}
    monkeypatch.setattr(daemon, "_online_cpus", lambda: online["cpus"])
    first = daemon._engine_settings()
    assert daemon._engine_settings() is first
    assert first == engine_settings(daemon.policies, daemon.config.tick_s, frozenset({0}), frozenset({0, 1}),
                                    daemon.config.max_changes_per_minute, first.self_pid, first.self_start_time)

    online["cpus"] = frozenset({0})  # CPU 1 went offline
    offline = daemon._engine_settings()
    assert offline.online_cpus == frozenset({0}) and daemon._engine_settings() is offline

    assert daemon.reload()  # new policies and config objects, even with the same text
    reloaded = daemon._engine_settings()
    assert reloaded is not offline and reloaded == offline


def test_the_online_cpus_asked_every_tick_follow_a_hotplug_through_one_descriptor(tmp_path):
    online_file = tmp_path / "devices/system/cpu/online"
    online_file.parent.mkdir(parents=True)
    online_file.write_text("0-3\n")
    online = OnlineCpus(tmp_path)
    try:
        assert online() == frozenset(range(4))
        descriptor = online._file.fd
        online_file.write_text("0-1,3\n")  # CPU 2 went offline (rewritten in place, as sysfs does)
        assert online() == frozenset({0, 1, 3}) and online._file.fd == descriptor
        online.close()
        assert online() == frozenset({0, 1, 3})  # opened again
    finally:
        online.close()


def test_only_processes_an_always_policy_may_govern_are_placed_at_exec(tmp_path):
    """A build or a script execs many processes: the sample names (and reads in full) only those an
    `always` policy may govern, judged from their sketch; with a policy naming a user, a sketch
    cannot tell, and every one is named."""
    import types
    from pathlib import Path

    from remediator.procfs import ProcessInfo

    maintenance = (Path(__file__).resolve().parent.parent / "policies" / "maintenance.toml").read_text()
    daemon = Daemon(write_config(tmp_path, [1], mode="dry-run", policy_text=maintenance))
    logrotate = ProcessInfo(pid=50, start_time=5, comm="logrotate")
    infos = {logrotate.pid: logrotate}
    daemon.collector = types.SimpleNamespace(sketch=infos.get)
    assert daemon._placed_at_exec(logrotate)
    assert daemon._placed_at_exec(ProcessInfo(pid=60, start_time=6, comm="updatedb.plocat"))
    assert not daemon._placed_at_exec(ProcessInfo(pid=70, start_time=7, comm="sleep", ppid=50, ancestors=((50, "logrotate"),)))
    # gzip under logrotate is governed by a policy that is not `always`: not placed at exec.
    assert not daemon._placed_at_exec(ProcessInfo(pid=71, start_time=7, comm="gzip", ppid=50, ancestors=((50, "logrotate"),)))
    (tmp_path / "policies" / "shipper.toml").write_text(maintenance.replace('comm = ["mandb"]', 'comm = ["mandb"]\nuser = ["man"]'))
    assert daemon.reload()
    assert daemon._placed_at_exec(ProcessInfo(pid=70, start_time=7, comm="sleep"))
