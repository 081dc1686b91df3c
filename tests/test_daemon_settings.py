"""The daemon's engine settings are built once and kept while their inputs stay (they were built
again on every tick): a reload, a CPU going offline or another request set builds them again."""

from __future__ import annotations

from helpers.daemon import write_config
from remediator import daemon as daemon_module
from remediator.daemon import Daemon
from remediator.tick import engine_settings


def test_engine_settings_are_kept_until_an_input_changes(tmp_path, monkeypatch):
    daemon = Daemon(write_config(tmp_path, [1], mode="dry-run"))
    online = {"cpus": frozenset({0, 1})}
    monkeypatch.setattr(daemon_module, "online_cpus", lambda: online["cpus"])
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
