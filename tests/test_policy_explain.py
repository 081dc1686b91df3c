"""`policy explain`: against a fake procfs tree (every exclusion and effect, deterministic), and as
root against real processes started by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.policy_procs import add_process, check_host_argv, make_proc_root, make_sys_root
from helpers.workloads import WORKLOADS, hog_argv, victim_argv
from remediator.cgroupfs import CgroupMount
from remediator.cli import main
from remediator.cpulist import format_cpulist
from remediator.errors import RemediatorError
from remediator.explain import explain
from remediator.policy import load_policies
from remediator.procfs import ProcFS
from remediator.schedgroups import SchedGroups
from remediator.selectors import ProtectSelectors

POLICIES = """\
[[policy]]
name = "shippers"
description = "log shippers"
match.comm = ["fluent-bit"]
trigger.tail.above = "2ms"
trigger.offender.cpu = 0.5
[[policy.actions]]
nice = 10
[[policy.actions]]
affinity = "unprotected"

[[policy]]
name = "compressors"
description = "compressors under logrotate"
match.comm = ["gzip"]
match.ancestor = ["logrotate"]
trigger.always = true
[[policy.actions]]
affinity = "unprotected"

[[policy]]
name = "gzip-any"
description = "any gzip: less specific, so the compressors policy wins under logrotate"
match.comm = ["gzip"]
trigger.always = true
[[policy.actions]]
nice = 5

[[policy]]
name = "protected-too"
description = "matches the protected service, which must be excluded"
match.comm = ["victim"]
trigger.always = true
[[policy.actions]]
nice = 10
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "test.toml").write_text(POLICIES)
    return directory


def by_pid(report: dict) -> dict[str, dict[int, dict]]:
    return {entry["name"]: {item["pid"]: item for item in entry["processes"]} for entry in report["policies"]}


# -- fake procfs ------------------------------------------------------------------------------------

@pytest.fixture
def fake_host(tmp_path: Path):
    proc = make_proc_root(tmp_path)
    add_process(proc, 1, "systemd", ppid=0, exe="/usr/lib/systemd/systemd")
    add_process(proc, 2, "kthreadd", ppid=0, kernel_thread=True)
    add_process(proc, 30, "gzip", ppid=2, kernel_thread=True)  # a kernel thread that happens to be named gzip
    add_process(proc, 100, "victim", exe="/usr/bin/victim", threads={100: (0, "0"), 101: (0, "0")})
    add_process(
        proc, 200, "fluent-bit", exe="/usr/bin/fluent-bit", cgroup="/system.slice/fluent-bit.service",
        threads={200: (0, "0-3"), 201: (0, "0-3"), 202: (5, "0-3")},
    )
    add_process(proc, 300, "logrotate", exe="/usr/sbin/logrotate")
    add_process(proc, 301, "gzip", ppid=300, exe="/usr/bin/gzip", threads={301: (0, "0-3")})
    add_process(proc, 400, "gzip", exe="/usr/bin/gzip")  # not under logrotate
    add_process(proc, 500, "busy", exe="/usr/bin/busy")
    add_process(proc, 600, "fluent-bit", exe="/usr/bin/fluent-bit", ppid=700)  # a child of "remediator" (pid 700)
    add_process(proc, 700, "remediator", exe="/usr/bin/python3")
    return proc


def run_fake(proc: Path, policy_dir: Path, request=None, online=frozenset(range(4))):
    policies = load_policies([policy_dir])
    protect = ProtectSelectors.build(comms=["victim"])
    return explain(policies, protect, ProcFS(proc), online, request_cpus=request, self_pid=700)


def test_fake_host_matches_exclusions_and_first_steps(fake_host, policy_dir):
    report = run_fake(fake_host, policy_dir)
    data = report.to_json()
    assert data["request_cpus"] == "0" and data["request_cpus_source"] == "auto"
    assert data["unprotected_cpus"] == "1-3"
    assert [(p["pid"], p["selector"]) for p in data["protected"]] == [(100, "comm victim")]

    found = by_pid(data)
    shipper = found["shippers"][200]
    assert shipper["fields"] == ["comm"] and shipper["status"] == "acts"
    assert shipper["detail"] == "comm fluent-bit matches 'fluent-bit'"
    assert shipper["first_step"]["text"] == "nice 0 -> 10 on 2 threads, nice 5 -> 10 on 1 thread"
    assert found["shippers"][600]["status"] == "excluded"
    assert found["shippers"][600]["reason"] == "a child of remediator"

    compressor = found["compressors"][301]
    assert compressor["fields"] == ["comm", "ancestor"]
    assert "ancestor logrotate (pid 300) matches 'logrotate'" in compressor["detail"]
    assert compressor["first_step"]["text"] == "affinity 0-3 -> 1-3 on 1 thread"
    assert set(found["compressors"]) == {301}

    assert found["gzip-any"][301]["status"] == "overridden"
    assert found["gzip-any"][301]["reason"] == "policy compressors wins (more specific: 2 match fields > 1)"
    assert found["gzip-any"][400]["status"] == "acts"
    assert found["gzip-any"][400]["first_step"]["text"] == "nice 0 -> 5 on 1 thread"
    assert found["gzip-any"][30]["status"] == "excluded" and found["gzip-any"][30]["reason"] == "kernel thread"

    assert found["protected-too"][100]["status"] == "excluded"
    assert found["protected-too"][100]["reason"] == "protected service"
    everywhere = {pid for entry in found.values() for pid in entry}
    assert 500 not in everywhere and 300 not in everywhere


def test_fake_host_pid_1_and_self_are_excluded(fake_host, tmp_path):
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "all.toml").write_text(
        textwrap.dedent(
            """\
            [[policy]]
            name = "everything-named"
            description = "matches init and remediator itself"
            match.comm = ["systemd", "remediator"]
            trigger.always = true
            [[policy.actions]]
            nice = 10
            """
        )
    )
    report = explain(load_policies([directory]), ProtectSelectors.build(), ProcFS(fake_host), frozenset({0, 1}), self_pid=700)
    items = by_pid(report.to_json())["everything-named"]
    assert items[1]["reason"] == "PID 1 (init)"
    assert items[700]["reason"] == "remediator itself"
    assert any("nothing is protected" in note for note in report.notes)


CPUSET_V1 = CgroupMount(1, Path("/sys/fs/cgroup/cpuset"), "/", frozenset({"cpuset"}))
CPU_V1 = CgroupMount(1, Path("/sys/fs/cgroup/cpu,cpuacct"), "/", frozenset({"cpu", "cpuacct"}))


def host_mounts(monkeypatch, *mounts: CgroupMount) -> None:
    """The cgroup hierarchies the cpuset kind finds on 'this host' (not the test machine's)."""
    from remediator.actuators import cpuset as cpuset_module

    monkeypatch.setattr(cpuset_module, "discover_mounts", lambda: list(mounts))


def test_fake_host_cpuset_step_and_unprotected_note(fake_host, tmp_path, monkeypatch):
    host_mounts(monkeypatch, CPU_V1, CPUSET_V1)
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "cpuset.toml").write_text(
        textwrap.dedent(
            """\
            [[policy]]
            name = "shippers"
            description = "straight to a cpuset"
            match.unit = ["fluent-bit"]
            trigger.always = true
            [[policy.actions]]
            cpuset = { cpus = "unprotected", cgroup = "log-shippers" }
            """
        )
    )
    policies = load_policies([directory])
    protect = ProtectSelectors.build(comms=["victim"])
    report = explain(policies, protect, ProcFS(fake_host), frozenset(range(4)), self_pid=700)
    item = by_pid(report.to_json())["shippers"][200]
    assert item["detail"] == "unit fluent-bit.service matches 'fluent-bit.service'"
    assert item["first_step"]["text"] == "cpuset: move from /system.slice/fluent-bit.service to remediator-log-shippers with cpus 1-3"

    # The request path owning every online CPU leaves `unprotected` empty: said per process and once overall.
    report = explain(policies, protect, ProcFS(fake_host), frozenset(range(4)), request_cpus=frozenset(range(4)), self_pid=700)
    item = by_pid(report.to_json())["shippers"][200]
    assert item["first_step"]["text"] == "skipped: unprotected resolves to no CPU on this host"
    assert any("'unprotected' resolves to no CPU" in note for note in report.notes)


def test_fake_host_cpuset_step_on_a_host_without_cpuset_says_it_is_not_available(fake_host, tmp_path, monkeypatch):
    # As the cpu kind says of a host without a cpu controller: no "move from X to ..." that cannot happen.
    host_mounts(monkeypatch, CPU_V1)
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "cpuset.toml").write_text(
        '[[policy]]\nname = "shippers"\ndescription = "straight to a cpuset"\nmatch.unit = ["fluent-bit"]\n'
        'trigger.always = true\n[[policy.actions]]\ncpuset = { cpus = "unprotected", cgroup = "log-shippers" }\n')
    report = explain(load_policies([directory]), ProtectSelectors.build(comms=["victim"]), ProcFS(fake_host), frozenset(range(4)),
                     self_pid=700, cpuset_mount=None)
    item = by_pid(report.to_json())["shippers"][200]
    assert item["first_step"]["text"] == "not available on this host: no cgroup v1 cpuset hierarchy is mounted (v1 hierarchies: cpu,cpuacct)"


def test_fake_host_through_the_cli(fake_host, policy_dir, tmp_path, capsys):
    sysfs = make_sys_root(tmp_path, "0-3")
    argv = ["policy", "explain", str(policy_dir), "--protect-comm", "victim", "--proc-root", str(fake_host), "--sysfs-root", str(sysfs)]
    assert main(argv + ["--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["online_cpus"] == "0-3"
    assert by_pid(data)["shippers"][200]["first_step"]["text"] == "nice 0 -> 10 on 2 threads, nice 5 -> 10 on 1 thread"

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "policy shippers (" in text and "priority 0, specificity 1" in text
    assert "  pid 200 fluent-bit  started 2023-11-14" in text  # btime 1700000000 + 1000 ticks
    assert "    matched by comm: comm fluent-bit matches 'fluent-bit'" in text
    assert "    first step: nice 0 -> 10 on 2 threads, nice 5 -> 10 on 1 thread" in text
    assert "    excluded for safety: protected service" in text
    assert "    not acted on by this policy: policy compressors wins (more specific: 2 match fields > 1)" in text
    assert "request CPUs: 0 (auto: allowed CPUs of the protected processes' cgroups, or threads); online CPUs: 0-3; unprotected: 1-3" in text


def test_explain_with_config_uses_its_policies_and_request_cpus(fake_host, policy_dir, tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    config.write_text(f'[protect]\ncomm = ["victim"]\nrequest_cpus = "0-1"\n[daemon]\npolicies = ["{policy_dir}"]\n')
    sysfs = make_sys_root(tmp_path, "0-3")
    argv = ["policy", "explain", "--config", str(config), "--proc-root", str(fake_host), "--sysfs-root", str(sysfs), "--format", "json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["request_cpus"], data["request_cpus_source"], data["unprotected_cpus"]) == ("0-1", "config", "2-3")
    assert by_pid(data)["compressors"][301]["first_step"]["text"] == "affinity 0-3 -> 2-3 on 1 thread"


def test_explain_refuses_invalid_policies_with_located_errors(tmp_path, capsys):
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "bad.toml").write_text('[[policy]]\nname = "x"\n')
    assert main(["policy", "explain", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{directory}/bad.toml:1:1: error: policy[0]: missing required keys 'description', 'match', 'trigger', 'actions'"
    ]


# -- real processes -----------------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    procfs = ProcFS()
    return [child for child in procfs.pids() if _ppid(procfs, child) == pid]


def _ppid(procfs: ProcFS, pid: int) -> int | None:
    try:
        return procfs.stat(pid).ppid
    except RemediatorError:  # exited while scanning: not a child any more
        return None


def thread_nice(pid: int) -> dict[int, int]:
    return {int(tid): os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def run_cli(argv: list[str]) -> str:
    """The CLI in its own process: the workloads are children of the test process, which
    explain would rightly exclude as "a child of remediator" if it ran in-process."""
    done = subprocess.run([sys.executable, "-m", "remediator", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.root
def test_explain_real_processes(spawn, policy_dir):
    protected = spawn(victim_argv(cpu=0), own_session=False)  # comm "victim", pinned to CPU 0: the request path
    shipper = spawn(hog_argv("fluent-bit", 2), own_session=False)  # the victim's session: its nice step can work
    tree = spawn([hog_argv()[0], str(WORKLOADS / "logrotate_tree.py")])
    gzip_pid = children_of(tree.pid)[0]
    unrelated = spawn(hog_argv("unrelated-busy", 1))
    shipper_threads = len(os.listdir(f"/proc/{shipper.pid}/task"))
    online = sorted(os.sched_getaffinity(0))
    if len(online) < 2:
        pytest.skip("needs 2 CPUs to have an unprotected CPU")

    argv = ["policy", "explain", str(policy_dir), "--protect-comm", "victim"]
    nice_before = thread_nice(shipper.pid)
    affinity_before = os.sched_getaffinity(gzip_pid)
    data = json.loads(run_cli(argv + ["--format", "json"]))
    found = by_pid(data)

    assert data["request_cpus"] == "0"
    assert protected.pid in {p["pid"] for p in data["protected"] if p["selector"] == "comm victim"}

    item = found["shippers"][shipper.pid]
    assert (item["comm"], item["fields"], item["status"]) == ("fluent-bit", ["comm"], "acts")
    # The values shown are the kernel's, as getpriority reports them. (Compared with values read
    # before and after: another test's live daemon on this host may renice a "fluent-bit" meanwhile.)
    nice_after = thread_nice(shipper.pid)
    assert len(item["first_step"]["threads"]) == shipper_threads
    if nice_before == nice_after:
        assert {int(tid): nice for tid, nice in item["first_step"]["threads"].items()} == nice_after
        if set(nice_after.values()) == {0}:
            assert item["first_step"]["text"] == f"nice 0 -> 10 on {shipper_threads} threads"
        else:
            assert item["first_step"]["text"].startswith(("nice ", "no change: nice already 10")), item

    item = found["compressors"][gzip_pid]
    assert (item["comm"], item["fields"], item["status"]) == ("gzip", ["comm", "ancestor"], "acts")
    assert f"ancestor logrotate (pid {tree.pid}) matches 'logrotate'" in item["detail"]
    if affinity_before == os.sched_getaffinity(gzip_pid):
        assert item["first_step"]["text"] == (
            f"affinity {format_cpulist(affinity_before)} -> {format_cpulist(set(online) - {0})} on 1 thread"
        )
    assert found["gzip-any"][gzip_pid]["status"] == "overridden"

    assert found["protected-too"][protected.pid]["status"] == "excluded"
    assert found["protected-too"][protected.pid]["reason"] == "protected service"

    everywhere = {pid for entry in found.values() for pid in entry}
    assert unrelated.pid not in everywhere
    assert tree.pid not in everywhere  # logrotate itself matches no policy here

    text = run_cli(argv)
    assert f"  pid {shipper.pid} fluent-bit  started " in text
    if set(thread_nice(shipper.pid).values()) == {0}:
        assert f"    first step: nice 0 -> 10 on {shipper_threads} threads" in text
    assert f"  pid {gzip_pid} gzip  started " in text
    assert f"  pid {protected.pid} victim  started " in text
    assert f"pid {unrelated.pid} " not in text


@pytest.mark.root
def test_explain_a_sched_step_reads_each_threads_policy_and_never_raises(spawn, tmp_path):
    shipper = spawn(hog_argv("sched-shipper", 2))
    main, first, second = sorted(int(tid) for tid in os.listdir(f"/proc/{shipper.pid}/task"))
    os.sched_setscheduler(second, os.SCHED_IDLE, os.sched_param(0))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "idle.toml").write_text(
        '[[policy]]\nname = "idle-shipper"\ndescription = "t"\nmatch = { comm = "sched-shipper" }\n'
        "trigger = { always = true }\nactions = [{ sched = \"batch\" }, { sched = \"idle\" }]\n"
    )
    data = json.loads(run_cli(["policy", "explain", str(policies), "--format", "json"]))
    step = by_pid(data)["idle-shipper"][shipper.pid]["first_step"]
    assert step["kind"] == "sched" and step["target"] == "batch"
    assert step["threads"] == {str(main): "other", str(first): "other", str(second): "idle"}
    assert step["text"] == "sched other -> batch on 2 threads, left as it is on 1 thread (already at or below, or realtime)"
    assert os.sched_getscheduler(second) == os.SCHED_IDLE and os.sched_getscheduler(main) == os.SCHED_OTHER  # read only


RELATIVE_POLICY = """\
[[policy]]
name = "shippers"
description = "log shippers, judged against the service's baseline"
match.comm = ["fluent-bit"]
trigger.tail = { above = "5x baseline", at_least = "200us", at_most = "2ms" }
trigger.offender = { cpu = 0.5, blame_share = 0.2 }
[[policy.actions]]
nice = 10
"""


def test_explain_shows_the_threshold_from_the_baseline_the_daemon_learned(fake_host, tmp_path, capsys):
    import time

    from remediator import histogram
    from remediator.baseline import Baselines
    from remediator.engine import EngineState, export_state
    from remediator.statefile import save_state, state_path_for

    directory = tmp_path / "relative"
    directory.mkdir()
    (directory / "p.toml").write_text(RELATIVE_POLICY)
    journal = tmp_path / "journal.jsonl"
    config = tmp_path / "remediator.toml"
    config.write_text(f'[protect]\ncomm = ["victim"]\n[daemon]\npolicies = ["{directory}"]\njournal = "{journal}"\n')
    sysfs = make_sys_root(tmp_path, "0-3")
    argv = ["policy", "explain", "--config", str(config), "--proc-root", str(fake_host), "--sysfs-root", str(sysfs)]

    assert main(argv) == 0
    assert "threshold now: 2ms (at_most: no baseline learned yet; it takes 6 s of quiet windows" in capsys.readouterr().out

    (fake_host / "sys/kernel/random").mkdir(parents=True)
    (fake_host / "sys/kernel/random/boot_id").write_text("this-boot\n")
    learned, now = Baselines(), time.monotonic() - 10
    quiet = histogram.from_values([50_000] * 200 + [100_000] * 4)  # p99 ~100 us
    for _ in range(40):
        now += 0.25
        learned = learned.learn({99.0: 2000.0}, quiet, 0.25, now)
    save_state(state_path_for(journal), export_state(EngineState(baselines=learned)), "this-boot")
    assert main(argv + ["--format", "json"]) == 0
    entry = json.loads(capsys.readouterr().out)["policies"][0]
    assert 90 <= entry["baseline_us"] <= 110
    assert entry["threshold_now"].startswith(f"{5 * entry['baseline_us']:g}us (5x baseline")
    assert "learned by the daemon" in entry["threshold_now"]


def test_explain_says_which_steps_cannot_work_between_scheduling_groups(fake_host, policy_dir):
    """fluent-bit in a session (autogroup) of its own: its nice step cannot reach the victim, so
    explain names it and shows the step the daemon would take first instead."""
    (fake_host / "sys/kernel").mkdir(parents=True, exist_ok=True)
    (fake_host / "sys/kernel/sched_autogroup_enabled").write_text("1\n")
    for pid, group in ((100, 4), (200, 9), (600, 4)):
        (fake_host / str(pid) / "autogroup").write_text(f"/autogroup-{group} nice 0\n")
    report = explain(load_policies([policy_dir]), ProtectSelectors.build(comms=["victim"]), ProcFS(fake_host),
                     frozenset(range(4)), self_pid=700, sched_groups=SchedGroups(ProcFS(fake_host), None))
    data = report.to_json()
    assert data["protected"][0]["sched_group"] == "autogroup-4"
    shipper = by_pid(data)["shippers"][200]
    assert shipper["sched_group"] == "autogroup-9"
    assert [(s["index"], s["step"]) for s in shipper["steps_that_cannot_work"]] == [(0, "nice 10")]
    assert "fluent-bit (200) is in autogroup-9" in shipper["steps_that_cannot_work"][0]["reason"]
    assert shipper["first_step"]["step"] == "affinity unprotected" and shipper["first_step"]["index"] == 1
    text = report.to_text()
    assert "cannot work on this host: step 1 (nice 10), skipped at once" in text
    assert "first step: step 2 (affinity unprotected): affinity" in text


def test_check_host_warns_at_each_step_that_cannot_work_here(fake_host, policy_dir, tmp_path, capsys, monkeypatch):
    (fake_host / "sys/kernel").mkdir(parents=True, exist_ok=True)
    (fake_host / "sys/kernel/sched_autogroup_enabled").write_text("1\n")
    for pid, group in ((100, 4), (200, 9)):
        (fake_host / str(pid) / "autogroup").write_text(f"/autogroup-{group} nice 0\n")
    argv = check_host_argv(tmp_path, monkeypatch, fake_host, policy_dir)
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0
    warnings = [line for line in out.splitlines() if "cannot work on this host now" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"{policy_dir / 'test.toml'}:7:1: warning:")  # the nice step's table
    assert "policy shippers: nice 10 cannot work on this host now for pid 200 (fluent-bit)" in warnings[0]
    code = main(argv[:-1] + [str(policy_dir)])
    assert code == 1 and "no config" in capsys.readouterr().err


def test_check_host_never_says_nice_sched_or_affinity_are_not_available(fake_host, tmp_path, capsys, monkeypatch):
    """They need only syscalls every Linux host has (actuators/kind.py AvailableEverywhere): no
    step-not-available at their steps, whatever the host's cgroups."""
    policies = tmp_path / "everywhere"
    policies.mkdir()
    (policies / "steps.toml").write_text(textwrap.dedent("""\
        [[policy]]
        name = "shippers"
        description = "log shippers"
        match.comm = ["fluent-bit"]
        trigger.always = true
        [[policy.actions]]
        nice = 10
        [[policy.actions]]
        sched = "idle"
        [[policy.actions]]
        affinity = "unprotected"
        """))
    argv = check_host_argv(tmp_path, monkeypatch, fake_host, policies, "--format", "json")
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["errors"] == 0
    assert [d for d in report["diagnostics"] if d["code"] == "step-not-available"] == []
