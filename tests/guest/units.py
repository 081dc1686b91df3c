"""systemd units and remediator's own unit in a guest: start, stop, read, and always clean up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

CHECKOUT = Path("/opt/remediator")
REMEDIATOR = str(CHECKOUT / ".venv/bin/remediator")
WORKLOADS = CHECKOUT / "tests/workloads"
CONFIG = Path("/etc/remediator/remediator.toml")
POLICIES = Path("/etc/remediator/guest-policies")
AUDIT = Path("/var/log/remediator/audit.jsonl")
JOURNAL = Path("/var/lib/remediator/journal.jsonl")
UNIT_DIR = Path("/etc/systemd/system")

# The properties a remediation may touch, and those that show the unit is still whole.
COMPARED_PROPERTIES = ("AllowedCPUs", "CPUWeight", "CPUQuotaPerSecUSec", "MemoryMax", "TasksMax", "ControlGroup", "Nice", "CPUAffinity")


# The config `remediator revert --all` reads in the action tests: PID 1 protected, no policies, the
# journal the tests' executors write.
ACTION_CONFIG_TEXT = f"""
[protect]
pids = [1]
[daemon]
mode = "live"
policies = []
journal = "{JOURNAL}"
"""


def revert_all() -> subprocess.CompletedProcess:
    """`remediator revert --all` with the config in place, as an operator would after a crash."""
    return subprocess.run([REMEDIATOR, "revert", "--all", "--config", str(CONFIG)], capture_output=True, text=True, timeout=120)


def cpu_step_then_sigkill(pid: int, setting: tuple, group: str, executor_options: str = "") -> subprocess.CompletedProcess:
    """A daemon that applies one cpu step to pid and is killed with SIGKILL right after (no clean-up
    at all), leaving the journal it wrote. Its stdout is the outcome's status."""
    return subprocess.run([sys.executable, "-c", f"""
import os, sys
sys.path.insert(0, "/opt/remediator/tests")
from helpers.remediation import make_executor
from remediator.model import ActionRequest
from remediator.procfs import ProcFS
executor = make_executor(__import__("pathlib").Path("{JOURNAL}"){executor_options})
request = ActionRequest(ProcFS().identity({pid}), "cpu", "{group}", 0, {{"cpu": dict({setting!r}), "group": "{group}"}})
print(executor.apply(request, ()).status, flush=True)
os.kill(os.getpid(), {int(signal.SIGKILL)})
"""], capture_output=True, text=True, timeout=120, cwd=str(CHECKOUT))


@contextlib.contextmanager
def hog_in_group(directory: Path, comm: str, after_kill: Callable[[], object] = lambda: None) -> Iterator[int]:
    """A two-thread hog in a cgroup made here under the root (in no unit, holding no limits), with
    ACTION_CONFIG_TEXT in place. At the end, failed test or not: `revert --all`, the hog killed,
    `after_kill` (the test's own leftovers), the group removed, the journal and config as before."""
    saved = CONFIG.read_text() if CONFIG.exists() else None
    write_root_file(CONFIG, ACTION_CONFIG_TEXT)
    directory.mkdir()
    hog = subprocess.Popen([sys.executable, str(WORKLOADS / "hog.py"), "--comm", comm, "--threads", "2"])
    try:
        (directory / "cgroup.procs").write_text(str(hog.pid))
        assert cgroup_of(hog.pid) == "/" + directory.name
        yield hog.pid
    finally:
        revert_all()
        hog.kill()
        hog.wait(timeout=30)
        after_kill()
        wait_for(lambda: not directory.exists() or not (directory / "cgroup.procs").read_text().split(), 10, f"{directory} empty")
        directory.rmdir()
        JOURNAL.unlink(missing_ok=True)
        if saved is not None:
            write_root_file(CONFIG, saved)


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()} {out.stdout.strip()}")
    return out


def show(unit: str, *properties: str) -> dict[str, str]:
    out = systemctl("show", unit, "-p", ",".join(properties)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_text(unit: str, since: float) -> str:
    """The unit's journal from the whole second `since` falls in: rounded to the nearest, 100.6
    asked from 101 and missed a line logged at 100.8 (a reload refused within the second: the
    test then waited its 60 s out)."""
    return subprocess.run(
        ["journalctl", "-u", unit, "--since", f"@{int(since)}", "-o", "cat", "--no-pager"], capture_output=True, text=True, timeout=60
    ).stdout


def install_unit(name: str, text: str) -> None:
    (UNIT_DIR / name).write_text(text)
    systemctl("daemon-reload")


def remove_unit(name: str) -> None:
    systemctl("stop", name, check=False)
    systemctl("reset-failed", name, check=False)
    # Runtime properties (ours, should a test fail before giving them back) must not reach the next test.
    systemctl("revert", name, check=False)
    (UNIT_DIR / name).unlink(missing_ok=True)
    systemctl("daemon-reload")


def main_pid(unit: str) -> int:
    return int(show(unit, "MainPID")["MainPID"])


def unit_pids(unit: str) -> list[int]:
    group = show(unit, "ControlGroup")["ControlGroup"]
    pids = []
    for procs in Path("/sys/fs/cgroup", group.lstrip("/")).rglob("cgroup.procs") if group else ():
        pids += [int(pid) for pid in procs.read_text().split()]
    return pids


def thread_states(pid: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Every thread's (nice, allowed CPUs)."""
    states = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            states[tid] = (os.getpriority(os.PRIO_PROCESS, tid), tuple(sorted(os.sched_getaffinity(tid))))
        except OSError:
            continue
    return states


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def processes_named(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def audit_records(since: float = 0.0) -> list[dict]:
    if not AUDIT.exists():
        return []
    records = [json.loads(line) for line in AUDIT.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("epoch", 0) >= since]


def step_outcomes(records: list[dict], outcome: str) -> dict[int, float]:
    """Ladder step index -> when it first had this outcome ("applied", "would-apply")."""
    seen: dict[int, float] = {}
    for record in records:
        if record.get("outcome") == outcome and "step" in record:
            seen.setdefault(record["step"]["index"], record["epoch"])
    return seen


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def write_root_file(path: Path, text: str) -> None:
    """Root-owned and not group/world-writable: what the daemon trusts."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.write_text(text)
    os.chmod(path, 0o644)


def security_exposure(unit: str) -> tuple[float, str]:
    out = subprocess.run(["systemd-analyze", "security", "--no-pager", unit], capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr
    return float(match.group(1)), match.group(2)
