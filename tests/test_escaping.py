"""comm, cmdline, exe and cgroup paths are chosen by whoever runs the process: every human-readable
output escapes them (one line per record, no escape sequence reaches a terminal), while the audit
log and the --json outputs keep them exact.

A real process names itself with a newline, a forged journald priority and an ESC sequence
(/proc/self/comm), and carries control characters in its command line.
"""

from __future__ import annotations

import json
import sys

import pytest

from remediator import executor as executor_module
from remediator.audit import AuditLog
from remediator.cli import main
from remediator.model import Outcome
from remediator.procfs import ProcFS, ProcessIdentity
from remediator.sample import ProcessUsage, ProtectedWaits, Sample
from remediator.view import interval_view, render_text

FORGED_COMM = "ev\n<0>x\x1b[2J"  # 11 bytes: fits comm's 15
ESCAPED_COMM = "ev\\n<0>x\\x1b[2J"
ARGS = ["\x1b]0;owned\x07", "a\x08b\x9b"]
NAMER = (
    "import sys, time\n"
    "open('/proc/self/comm', 'w').write(sys.argv[1])\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def forged(spawn):
    workload = spawn([sys.executable, "-c", NAMER, FORGED_COMM, *ARGS])
    info = ProcFS().process_info(workload.pid)
    assert info.comm == FORGED_COMM  # the kernel keeps the bytes as written
    assert list(info.cmdline[-3:]) == [FORGED_COMM, *ARGS]
    return info


def assert_harmless(text: str) -> None:
    for control in ("\x1b", "\x07", "\x08", "\x9b", "\r"):
        assert control not in text
    assert not any(line.startswith("<0>") for line in text.splitlines())
    assert ESCAPED_COMM in text


def test_watch_rendering(forged):
    waits = ProtectedWaits(threads=1, pids=(forged.pid,), waits=4, wakeups=4, preemptions=0, wait_ns=4000, max_ns=2000, histogram=((10, 4),))
    sample = Sample(
        ts=1_700_000_000.0, start_ns=0, end_ns=1_000_000_000, source="bpf", window_ns=0, ncpus=2, protected=waits,
        usage=(ProcessUsage(forged.pid, forged.comm, 500_000_000, None),), blame=((forged.pid, 3000),), cpu_busy_ns=(0, 0),
        processes={forged.pid: forged},
    )
    view = interval_view(sample)
    assert view["top_cpu"][0]["comm"] == FORGED_COMM  # --json: exact
    text = render_text(view, sample)
    assert_harmless(text)
    assert text.count(ESCAPED_COMM) == 3  # the protected list, top CPU, top blame


def test_audit_table_and_json(forged, tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    record = {
        "ts": "2026-11-25T10:00:00.000000Z", "mode": "live", "decision": "act", "policy": {"name": "p"},
        "process": {"pid": forged.pid, "comm": forged.comm, "cmdline": list(forged.cmdline), "exe": forged.exe},
        "step": {"action": "nice"}, "outcome": "refused",
        "change": f"pid {forged.pid} ({forged.comm}) is off limits: {' '.join(forged.cmdline)}",
    }
    audit.write(record)
    audit.close()
    assert main(["audit", str(path)]) == 0
    table = capsys.readouterr().out
    assert_harmless(table)
    assert len(table.splitlines()) == 2  # the header and one row
    assert main(["audit", str(path), "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["process"] == record["process"]  # exact
    assert json.loads(path.read_text())["process"]["comm"] == FORGED_COMM  # the log itself: exact


def test_policy_explain(forged, tmp_path, capsys):
    (tmp_path / "p.toml").write_text(
        '[[policy]]\nname = "forged"\ndescription = "d"\nmatch.comm = "ev*"\ntrigger.always = true\n[[policy.actions]]\nnice = 10\n'
    )
    assert main(["policy", "explain", str(tmp_path), "--protect-comm", "no-such-service"]) == 0
    text = capsys.readouterr().out
    assert_harmless(text)
    assert f"  pid {forged.pid} {ESCAPED_COMM}  started " in text
    assert main(["policy", "explain", str(tmp_path), "--protect-comm", "no-such-service", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    [item] = [item for policy in data["policies"] for item in policy["processes"] if item["pid"] == forged.pid]
    assert item["comm"] == FORGED_COMM  # JSON: exact


def test_revert_output(forged, tmp_path, capsys, monkeypatch):
    # What the executor says of a process it will not touch names its comm (executor.py); revert
    # prints each outcome on one escaped line.
    identity = ProcessIdentity(forged.pid, forged.start_time)
    refused = Outcome("refused", "nice", identity, f"pid {forged.pid} ({forged.comm}) is off limits: protected service")

    class Restoring(executor_module.Executor):
        def restore(self):
            return [refused]

    monkeypatch.setattr("remediator.commands.revert.Executor", Restoring)
    (tmp_path / "journal.jsonl").write_text("")
    assert main(["revert", "--all", "--journal", str(tmp_path / "journal.jsonl")]) == 0  # refused is not an error
    out = capsys.readouterr().out
    assert_harmless(out)
    assert out.splitlines()[-1] == f"refused nice pid {forged.pid}: pid {forged.pid} ({ESCAPED_COMM}) is off limits: protected service"
