"""`remediator demo` on this host: the whole story, and Ctrl-C at any moment leaves nothing behind.

Live (root, BPF): the demo starts a service, a bursting fluent-bit and the daemon. Interrupted at
start, before the change and after it, it must leave no process it started, no remediator cgroup,
no journal entry and no directory; run to the end, it must have acted, given everything back and
written its report. The live tests are marked root and bpf."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from remediator.demo import remediator_cgroups

REMEDIATOR = str(Path(sys.executable).with_name("remediator"))

def live(test):
    return pytest.mark.root(pytest.mark.bpf(test))


def test_the_demo_config_is_valid_and_names_only_its_own_files(tmp_path):
    from remediator.config import load_config
    from remediator.demo import SHIPPED_POLICIES, demo_config, sparkline

    (tmp_path / "remediator.toml").write_text(demo_config(tmp_path, [os.getpid()]))
    config = load_config(tmp_path / "remediator.toml")
    assert config.policy_paths == (SHIPPED_POLICIES,) and config.mode == "live" and config.revert_on_exit
    assert {config.journal_path.parent, config.audit_path.parent, config.recording_path.parent} == {tmp_path}
    assert sparkline([10, 30, 2000, 1e6, None]) == "▁▁▆█?"


class DemoRun:
    def __init__(self, tmp_path: Path, duration: float):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([REMEDIATOR, "demo", "--duration", str(duration), "--dir", str(tmp_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def pids(self) -> set[int]:
        return {int(pid) for line in self.lines for pid in re.findall(r"\(pid (\d+)\)", line)}

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)
        return code


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def demo(tmp_path):
    before = remediator_cgroups()
    runs: list[DemoRun] = []

    def start(duration: float = 20.0) -> DemoRun:
        run = DemoRun(tmp_path, duration)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        print("\n".join(run.lines))
    assert remediator_cgroups() == before


def assert_nothing_left(run: DemoRun, tmp_path: Path, pids: set[int]) -> None:
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left running: {left}"
    assert not list(tmp_path.glob("remediator-demo-*")), "the demo directory is left behind"


@live
@pytest.mark.parametrize("moment", ["at start", "before the change", "after the change"])
def test_ctrl_c_leaves_nothing_behind(demo, tmp_path, moment):
    cgroups_before = remediator_cgroups()
    own = (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0))
    run = demo(40.0)
    if moment == "at start":
        run.wait_for(r"^demo directory", 10)
    elif moment == "before the change":
        run.wait_for(r"started a sidecar", 30)  # its first burst comes 5 s later
        time.sleep(1.0)
    else:
        run.wait_for(r">>> ACT", 40)
        time.sleep(0.5)
    pids = run.pids()
    if moment != "at start":
        assert len(pids) >= 4, run.lines  # service, client, daemon, sidecar
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(60) == 128 + signal.SIGINT
    pids |= run.pids()
    assert_nothing_left(run, tmp_path, pids)
    assert remediator_cgroups() == cgroups_before
    assert any("demo interrupted" in line for line in run.lines), run.lines
    assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)) == own


@live
def test_the_whole_story_ends_in_a_report(demo, tmp_path):
    cgroups_before = remediator_cgroups()
    run = demo(20.0)
    run.wait_for(r"started a sidecar", 30)
    code = run.finish(120)
    assert code == 0, "\n".join(run.lines)
    report = Path(run.wait_for(r"^report: ", 1).split("report: ", 1)[1])
    assert report.exists() and report.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    directory = report.parent
    audit = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    acts = [r for r in audit if r["decision"] == "act"]
    assert acts and all(r["policy"]["name"] == "log-shippers" and r["process"]["comm"] == "fluent-bit" for r in acts)
    assert acts[0]["step"]["action"] == "cpu_idle" and acts[0]["outcome"] == "applied"
    given_back = [r for r in audit if r["decision"] == "exit" and r["outcome"] == "restored"]
    assert given_back, "revert_on_exit gave nothing back"
    assert any(line.startswith(">>> ACT") for line in run.lines) and any("GIVEN BACK" in line for line in run.lines)
    page = report.read_text()
    assert "<td>cpu_idle</td>" in page
    left = [pid for pid in run.pids() if alive(pid)]
    assert not left
    assert remediator_cgroups() == cgroups_before
    journal = directory / "journal.jsonl"
    assert subprocess.run([REMEDIATOR, "revert", "--all", "--journal", str(journal)], capture_output=True,
                          text=True).stdout.count("restored") == 0  # nothing left to give back


def test_a_ctrl_c_that_python_dropped_still_stops_the_demo_at_its_next_step(tmp_path):
    """A SIGINT landing while subprocess forks a workload raises KeyboardInterrupt inside an at-fork
    callback, where Python reports it and drops it (seen in CI: the demo then ran its 40 s). The
    handler also sets a flag, and the demo's next step stops on it: a workload just started, the
    wait for a ready line, the watch loop."""
    import io

    from remediator.demo import CtrlC, Demo

    ctrl_c = CtrlC()
    with pytest.raises(KeyboardInterrupt):
        ctrl_c(signal.SIGINT, None)  # what the handler does; say this exception was dropped
    demo = Demo(tmp_path, 60.0, out=io.StringIO(), ctrl_c=ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.start("sleeper", ["sleep", "60"], stdout=subprocess.PIPE, text=True)
        sleeper = demo.children[-1][1]  # started, and kept for the clean-up
        with pytest.raises(KeyboardInterrupt):
            demo.ready_line(sleeper, "sleeper")
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            demo.watch(None, None, time.monotonic() + 60)
        assert time.monotonic() - started < 1.0
    finally:
        assert demo.cleanup() == []
    assert sleeper.returncode is not None  # the clean-up stopped it
