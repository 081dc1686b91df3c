"""Run `remediator run` as a real process in tests, with configs written to a temporary directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REMEDIATOR = str(Path(sys.executable).with_name("remediator"))

SHIPPER_POLICY = """
[[policy]]
name = "test-shipper"
description = "fluent-bit in the tests: nice, then off the request CPU"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
# p99.9: on EEVDF kernels this victim's p99 often stays at ~20 us under contention, while p99.9
# reliably shows the hog's tick-long waits (see the README, "How the probes work").
tail = {{ percentile = 99.9, above = "{above}", windows = {windows}, of = 4 }}
offender = {{ cpu = 0.5, cpu_kind = "peak", blame_share = 0.3, require = "all" }}
[[policy.actions]]
nice = 10
settle = "1s"
[[policy.actions]]
affinity = "unprotected"
settle = "2s"
[policy.limits]
cooldown = "30s"
max_actions_per_hour = 10
revert_after_quiet = "never"
min_cpus = 1
"""


def write_config(
    directory: Path,
    protect_pids: list[int],
    *,
    mode: str = "live",
    above: str = "1ms",
    windows: int = 2,
    on_start: str = "restore",
    revert_on_exit: bool = True,
    policy_text: str | None = None,
    source: str | None = None,  # None: leave [daemon] source out, so the default is what runs
) -> Path:
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "shipper.toml").write_text(policy_text or SHIPPER_POLICY.format(above=above, windows=windows))
    config = directory / "remediator.toml"
    source_line = "" if source is None else f'source = "{source}"'
    config.write_text(
        f"""
[protect]
pids = {protect_pids}
request_cpus = "0"
[daemon]
mode = "{mode}"
{source_line}
tick = "250ms"
policies = ["policies"]
journal = "{directory}/journal.jsonl"
audit_log = "{directory}/audit.jsonl"
on_start = "{on_start}"
revert_on_exit = {str(revert_on_exit).lower()}
[limits]
max_changes_per_minute = 10
"""
    )
    return config


class DaemonProcess:
    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.log_path = config.parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [REMEDIATOR, "run", "--config", str(config), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.audit_path = config.parent / "audit.jsonl"

    def log(self) -> str:
        return self.log_path.read_text()

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon(request):
    """daemon(config, *args) -> DaemonProcess; killed at teardown if still running, and its log
    printed when the test failed (pytest shows captured output of failed tests)."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, env: dict | None = None) -> DaemonProcess:
        process = DaemonProcess(config, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        print(f"--- daemon log {process.log_path} ---\n{process.log()}")


def wait_until(predicate, timeout: float, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def thread_settings(pid: int) -> dict[int, tuple[int, frozenset[int]]]:
    """Every thread's (nice, allowed CPUs)."""
    settings = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            settings[tid] = (os.getpriority(os.PRIO_PROCESS, tid), frozenset(os.sched_getaffinity(tid)))
        except (ProcessLookupError, OSError):
            continue
    return settings


def run_delay_ns(pid: int) -> int:
    total = 0
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{name}/schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue
    return total


def wait_rate(pid: int, seconds: float) -> float:
    """The process's run-queue wait per second of wall time, from the kernel's schedstat."""
    before = run_delay_ns(pid)
    time.sleep(seconds)
    return (run_delay_ns(pid) - before) / seconds
