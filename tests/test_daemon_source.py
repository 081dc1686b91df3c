"""No silent degradation: `[daemon] source` and what the daemon says about the source it runs on.

With the default `source = "bpf"` a daemon whose probes cannot load refuses to start (one line on
stderr: the reason and how to opt into procfs; exit 1; the host untouched). With `"auto"` falling
back, or `"procfs"`, it runs, and its STATUS, start-up line, log summary and every audit record say
"degraded: no tail, no blame".

The live tests make the probes really fail: the daemon runs in a private mount namespace with an
empty tmpfs over /lib/modules, so bcc has no kernel header tree (the host's /lib/modules is not
touched). They are marked `bpf`: on this host the probes do load, so the failure is the namespace's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.daemon import REMEDIATOR, wait_until, write_config
from helpers.remediation import close, make_executor, nice_request, thread_nices
from remediator import sources
from remediator.cli import build_parser, main
from remediator.daemon import Daemon
from remediator.errors import SetupError

DEGRADED = "degraded: no tail, no blame"
SLEEPER = ["sh", "-c", "echo ready; exec sleep 600"]

PLACING_POLICY = """
[[policy]]
name = "test-placed"
description = "an always-policy: the only kind a daemon without tail and blame can apply"
[policy.match]
comm = ["placed-sleeper"]
[policy.trigger]
always = true
[[policy.actions]]
nice = 10
"""


# -- the override, in process ---------------------------------------------------------------------

@pytest.mark.parametrize("configured", ["bpf", "auto", "procfs", None])
def test_the_config_chooses_the_source_unless_the_command_line_overrides_it(tmp_path, configured):
    config = write_config(tmp_path, [1], mode="dry-run", source=configured)
    args = build_parser().parse_args(["run", "--config", str(config)])
    assert args.source is None  # no default of its own: the config's value stands
    assert Daemon(config, mode=args.mode, source=args.source).source_choice == (configured or "bpf")
    args = build_parser().parse_args(["run", "--config", str(config), "--source", "procfs"])
    assert Daemon(config, mode=args.mode, source=args.source).source_choice == "procfs"


def _probes_that_cannot_load(monkeypatch):
    def fail(*_args, **_kwargs):
        raise SetupError("the probes cannot load here (test)")

    monkeypatch.setattr(sources, "BpfSource", fail)


def test_without_probes_the_default_refuses_with_one_line_and_leaves_no_files(tmp_path, monkeypatch, capsys):
    _probes_that_cannot_load(monkeypatch)
    config = write_config(tmp_path, [1], mode="dry-run")
    assert main(["run", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "remediator: error: not starting: the eBPF probes cannot load: the probes cannot load here (test); to run "
        f'without them on procfs ({DEGRADED}), set source = "auto" (or "procfs") in the [daemon] table of {config}\n'
    )
    assert not (tmp_path / "audit.jsonl").exists() and not (tmp_path / "journal.jsonl").exists()


def test_an_explicit_bpf_on_the_command_line_names_the_flag_to_opt_out(tmp_path, monkeypatch, capsys):
    _probes_that_cannot_load(monkeypatch)
    config = write_config(tmp_path, [1], mode="dry-run", source="auto")
    assert main(["run", "--config", str(config), "--source", "bpf"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.rstrip().endswith("set --source auto (or procfs)")


def test_a_kernel_without_the_rename_and_move_tracepoints_is_named_at_start(tmp_path, monkeypatch, caplog):
    """Where the kernel lacks task:task_rename or cgroup:cgroup_attach_task, a process renamed or
    moved without exec is seen only at the full rescan: the daemon says so at start."""
    from remediator import daemon as daemon_module

    class SourceWithoutTaskEvents:
        name = "bpf"
        has_task_events = False

    monkeypatch.setattr(daemon_module, "open_source", lambda *_args, **_kwargs: (SourceWithoutTaskEvents(), None))
    config = write_config(tmp_path, [1], mode="dry-run")
    with caplog.at_level("WARNING", logger="remediator.daemon"):
        Daemon(config, mode="dry-run")._open_source()
    assert [record.getMessage() for record in caplog.records] == [
        "this kernel has no task:task_rename or cgroup:cgroup_attach_task tracepoint: a process renamed or moved "
        "to another cgroup without an exec is judged again only at the full rescan, every 60 s"]
    caplog.clear()
    SourceWithoutTaskEvents.has_task_events = True
    with caplog.at_level("WARNING", logger="remediator.daemon"):
        Daemon(config, mode="dry-run")._open_source()
    assert caplog.records == []


# -- real processes in a mount namespace without kernel headers ------------------------------------

def without_kernel_headers(argv: list[str]) -> list[str]:
    """argv in a private mount namespace with an empty tmpfs over /lib/modules (unshare execs sh,
    which execs argv: one pid throughout, so signals reach the daemon itself)."""
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount -t tmpfs none /lib/modules && exec "$@"', "sh", *argv]


@pytest.fixture
def headerless():
    """headerless(argv, env=None) -> (Popen, stderr path): started without kernel headers, killed at
    teardown even when the test fails, its stderr printed then."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed for a private mount namespace")
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(argv: list[str], stderr_path: Path, env: dict | None = None) -> subprocess.Popen:
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(without_kernel_headers(argv), stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={**os.environ, **(env or {})})
        started.append((proc, stderr_path))
        return proc

    yield start
    for proc, stderr_path in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        print(f"--- {stderr_path} ---\n{stderr_path.read_text()}")


def headers_problem() -> str:
    return f"no kernel header tree at /lib/modules/{os.uname().release}/build"


@pytest.mark.bpf
def test_default_source_without_headers_fails_to_start_and_changes_nothing(spawn, headerless, tmp_path):
    """Live mode, and a journal from an earlier run that left a process at nice 10: a daemon that
    started would restore it (on_start = "restore"); one that refuses must not."""
    victim, leftover = spawn(SLEEPER), spawn(SLEEPER)
    config = write_config(tmp_path, [victim.pid], mode="live", on_start="restore")
    journal = tmp_path / "journal.jsonl"
    earlier = make_executor(journal)
    earlier.apply(nice_request(leftover.pid, 10), ())
    close(earlier)
    journal_before = journal.read_bytes()

    stderr_path = tmp_path / "stderr.log"
    proc = headerless([REMEDIATOR, "run", "--config", str(config)], stderr_path)
    assert proc.wait(timeout=60) == 1
    err = stderr_path.read_text()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("remediator: error: not starting: the eBPF probes cannot load: " + headers_problem()), err
    assert f'set source = "auto" (or "procfs") in the [daemon] table of {config}' in err
    assert "Traceback" not in err
    assert set(thread_nices(leftover.pid).values()) == {10}  # not restored: the daemon never ran
    assert journal.read_bytes() == journal_before
    assert not (tmp_path / "audit.jsonl").exists()


@pytest.mark.bpf
def test_auto_without_headers_runs_degraded_and_says_so_everywhere(spawn, headerless, tmp_path):
    victim = spawn(SLEEPER)
    sleeper = tmp_path / "placed-sleeper"
    shutil.copy("/bin/sleep", sleeper)
    placed = spawn(["sh", "-c", f"echo ready; exec {sleeper} 600"])
    config = write_config(tmp_path, [victim.pid], mode="dry-run", source="auto", policy_text=PLACING_POLICY)
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    stderr_path = tmp_path / "stderr.log"
    try:
        proc = headerless([REMEDIATOR, "run", "--config", str(config)], stderr_path, env={"NOTIFY_SOCKET": address})
        messages: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("protected p99" in m for m in messages):
            messages.append(listener.recv(4096).decode())
    finally:
        listener.close()
    assert messages[0] == f"READY=1\nSTATUS=dry-run (source procfs, {DEGRADED}): starting", messages
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert statuses and all(DEGRADED in m for m in statuses), messages
    assert statuses[-1].startswith(f"STATUS=dry-run (source procfs, {DEGRADED}): protected p99 ")

    summary = wait_until(lambda: [line for line in stderr_path.read_text().splitlines() if "protected 1 process" in line],
                         10.0, what="the first log summary")[0]
    assert summary.endswith(f"; source procfs, {DEGRADED}") and "most blamed: unknown" in summary
    log = stderr_path.read_text()
    assert f'source "auto" falls back to procfs, {DEGRADED}' in log and headers_problem() in log
    assert f"tick 0.25 s, source procfs, {DEGRADED}, audit" in log  # the start-up line

    audit_path = tmp_path / "audit.jsonl"
    wait_until(lambda: audit_path.exists() and audit_path.read_text().strip(), 10.0, what="an audit record")
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert any(r["decision"] == "act" and r["process"]["pid"] == placed.pid for r in records), records
    assert all(r["source"] == "procfs" and r["degraded"] == "no tail, no blame" for r in records), records
    assert set(thread_nices(placed.pid).values()) == {0}  # dry-run

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.bpf
def test_the_command_line_overrides_the_default_source(spawn, headerless, tmp_path):
    victim = spawn(SLEEPER)
    config = write_config(tmp_path, [victim.pid], mode="dry-run")  # source left at its default, bpf
    stderr_path = tmp_path / "stderr.log"
    proc = headerless([REMEDIATOR, "run", "--config", str(config), "--source", "procfs", "--ticks", "3"], stderr_path)
    assert proc.wait(timeout=60) == 0, stderr_path.read_text()
    log = stderr_path.read_text()
    assert f'source "procfs": {DEGRADED}' in log and f"source procfs, {DEGRADED}, audit" in log
    assert "eBPF probes" not in log  # procfs asked for: the probes were not even tried
