"""The cpuset actuator on cgroup v2, against a fake cgroupfs tree with kernel-like rules.

This host binds cpuset to its v1 hierarchy, so its v2 tree cannot take the controller; the fake
tree (tests/helpers/fake_cgroupfs.py) models the v2 rules the actuator meets: cgroup.controllers
and subtree_control, the no-internal-process rule, leaf-only processes, EBUSY on rmdir.
"""

from __future__ import annotations

import errno
import shutil

import pytest

from helpers.fake_cgroupfs import FakeCgroupV2, FakeProcTree
from helpers.faults import FakeThreads
from remediator.actuators import CpusetActuator
from remediator.executor import Executor
from remediator.model import ActionRequest
from remediator.journal import Journal
from remediator.procfs import ProcessIdentity, ProcFS

# Beyond PID_MAX_LIMIT (4194304): no real process can ever have these ids.
PID, START = 5_000_001, 777
WORKERS = (5_000_002, 5_000_003)
SERVICE = "/system.slice/fluent-bit.service"


class V2Host:
    def __init__(self, tmp_path, *, parent="/", controllers="cpuset cpu io memory pids", uid=0):
        self.procs = FakeProcTree(tmp_path / "proc")
        self.cgroupfs = FakeCgroupV2(tmp_path / "cgroup", self.procs, cpus="0-3", mems="0", controllers=controllers)
        self.procs.add_process(PID, START, cgroup=SERVICE, tids=WORKERS, uid=uid)
        self.cgroupfs.make_cgroup("/system.slice")
        self.cgroupfs.make_cgroup(SERVICE, pids=[PID])
        self.threads = FakeThreads(frozenset(range(4)))
        for tid in (PID, *WORKERS):
            self.threads.add(tid)
        self.procfs = ProcFS(tmp_path / "proc")
        self.journal_path = tmp_path / "journal.jsonl"
        self.journals: list[Journal] = []
        self.parent = parent
        self.root = self.cgroupfs.root

    def executor(self, *, dry_run: bool = False) -> Executor:
        actuator = CpusetActuator(
            self.procfs, mount=self.cgroupfs.mount, cgroupfs=self.cgroupfs, syscalls=self.threads, parent=self.parent
        )
        journal = None
        if not dry_run:
            journal = Journal(self.journal_path)
            self.journals.append(journal)
        return Executor(journal, self.procfs, dry_run=dry_run, actuators={"cpuset": actuator}, self_pid=0)

    def request(self, cpus=frozenset({2, 3}), name="log-shippers") -> ActionRequest:
        return ActionRequest(ProcessIdentity(PID, START), "cpuset", "log-shippers", 0, {"cgroup": name, "cpus": sorted(cpus)})

    def close(self) -> None:
        for journal in self.journals:
            journal.close()


@pytest.fixture
def host(tmp_path):
    made = []

    def build(**options) -> V2Host:
        made.append(V2Host(tmp_path, **options))
        return made[-1]

    yield build
    for each in made:
        each.close()


def test_enables_cpuset_creates_the_cgroup_moves_the_process_and_restores(host):
    v2 = host()
    root = v2.root
    executor = v2.executor()

    outcome = executor.apply(v2.request(), ())

    assert outcome.status == "applied", outcome
    assert outcome.message == (
        f'write "+cpuset" to {root}/cgroup.subtree_control; mkdir {root}/remediator-log-shippers; '
        f'write "2-3" to .../cpuset.cpus; write "0" to .../cpuset.mems; write "{PID}" to .../cgroup.procs '
        f"(was {SERVICE})"
    )
    assert "cpuset" in (root / "cgroup.subtree_control").read_text().split()
    assert v2.cgroupfs.pids_in("/remediator-log-shippers") == [PID]
    assert v2.procs.cgroup(PID) == "/remediator-log-shippers"
    assert (root / "remediator-log-shippers" / "cpuset.cpus.effective").read_text().strip() == "2-3"

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert v2.procs.cgroup(PID) == SERVICE
    assert v2.cgroupfs.pids_in(SERVICE) == [PID]
    assert not (root / "remediator-log-shippers").exists()
    # "+cpuset" stays enabled (documented): it changes nothing by itself.
    assert "cpuset" in (root / "cgroup.subtree_control").read_text().split()


def test_another_users_offender_gets_a_cpuset_of_its_own(host):
    """Offenders of two users never share a group of ours (placement.per_user_name): a later step
    narrowing one user's cpuset must not narrow another's."""
    v2 = host(uid=1000)
    executor = v2.executor()

    outcome = executor.apply(v2.request(), ())

    assert outcome.status == "applied", outcome
    assert v2.procs.cgroup(PID) == "/remediator-log-shippers.uid1000"
    assert not (v2.root / "remediator-log-shippers").exists()
    [restored] = executor.restore()
    assert restored.status == "restored", restored
    assert not (v2.root / "remediator-log-shippers.uid1000").exists()


def test_a_cgroup_named_like_ours_deeper_down_keeps_its_limits_and_its_cpus(host):
    """Only a group directly under the cpuset parent is ours: one a container names
    `remediator-x` in its own subtree is checked as any other (never wider, never out of limits)."""
    v2 = host()
    v2.cgroupfs.make_cgroup("/system.slice/remediator-log-shippers")
    v2.cgroupfs.place("/system.slice/remediator-log-shippers", PID)
    v2.procs.set_cgroup(PID, "/system.slice/remediator-log-shippers")
    (v2.root / "system.slice" / "remediator-log-shippers" / "pids.max").write_text("100\n")

    outcome = v2.executor().apply(v2.request(), ())

    assert outcome.status == "invalid", outcome
    assert "pids.max" in outcome.message
    assert v2.procs.cgroup(PID) == "/system.slice/remediator-log-shippers"


def test_a_process_under_limits_is_not_moved_out_of_them(host):
    """On v2 one tree holds every controller: a process moved into remediator's cpuset would leave
    its cgroup's memory.max (a container's, a supervisor's) behind. Refused, nothing written."""
    v2 = host()
    (v2.root / "system.slice" / "memory.max").write_text("1073741824\n")
    v2.cgroupfs.calls.clear()

    outcome = v2.executor().apply(v2.request(), ())

    assert outcome.status == "invalid", outcome
    assert "would lift the limits of its cgroup" in outcome.message and "memory.max='1073741824'" in outcome.message
    assert v2.cgroupfs.changes() == [] and v2.procs.cgroup(PID) == SERVICE


def test_the_cpus_are_narrowed_to_those_its_cpuset_allows_now_never_widened(host):
    v2 = host()
    (v2.root / "system.slice" / "cpuset.cpus").write_text("1-2\n")
    (v2.root / "system.slice" / "cpuset.cpus.effective").write_text("1-2\n")

    outcome = v2.executor().apply(v2.request(cpus=frozenset({2, 3})), ())

    assert outcome.status == "applied", outcome
    assert (v2.root / "remediator-log-shippers" / "cpuset.cpus").read_text().strip() == "2"


def test_a_deeper_parent_gets_cpuset_enabled_all_the_way_down(host):
    v2 = host(parent="/remediator.slice")
    v2.cgroupfs.make_cgroup("/remediator.slice")
    outcome = v2.executor().apply(v2.request(), ())
    assert outcome.status == "applied", outcome
    enabled = [call for call in v2.cgroupfs.calls if call[1].endswith("cgroup.subtree_control")]
    assert enabled == [
        ("write", f"{v2.root}/cgroup.subtree_control", "+cpuset"),
        ("write", f"{v2.root}/remediator.slice/cgroup.subtree_control", "+cpuset"),
    ]
    assert v2.procs.cgroup(PID) == "/remediator.slice/remediator-log-shippers"


def test_no_internal_process_rule_is_detected_before_any_write(host):
    v2 = host(parent="/system.slice")
    v2.procs.add_process(5_000_100, 1, comm="stray")
    v2.cgroupfs.place("/system.slice", 5_000_100)  # a process directly in the would-be parent
    executor = v2.executor()

    outcome = executor.apply(v2.request(), ())

    assert outcome.status == "failed"
    assert outcome.message.startswith(f"cannot enable cpuset in {v2.root}/system.slice/cgroup.subtree_control: ")
    assert "holds processes (5000100)" in outcome.message and "no-internal-process rule" in outcome.message
    assert "configure a cpuset parent that holds no processes" in outcome.message
    assert v2.cgroupfs.calls == []
    assert v2.procs.cgroup(PID) == SERVICE
    assert executor.journal.entries() == []  # refused before the intent: nothing to restore


def test_ebusy_on_subtree_control_is_explained(host):
    v2 = host()
    v2.cgroupfs.fail("write", "cgroup.subtree_control", errno.EBUSY)

    outcome = v2.executor().apply(v2.request(), ())

    assert outcome.status == "failed"
    assert outcome.message == (
        f'write "+cpuset" to {v2.root}/cgroup.subtree_control failed with EBUSY: cgroup v2 will not enable a '
        "controller for the children of a non-root cgroup that holds processes of its own (no-internal-process rule); "
        "move those processes into a leaf cgroup, or configure a cpuset parent that holds no processes; nothing was changed"
    )
    assert v2.procs.cgroup(PID) == SERVICE


def test_ebusy_on_the_move_is_explained_and_the_new_cgroup_removed(host):
    v2 = host()
    v2.cgroupfs.fail("write", "cgroup.procs", errno.EBUSY)
    executor = v2.executor()

    outcome = executor.apply(v2.request(), ())

    assert outcome.status == "failed"
    assert f'write "{PID}" to {v2.root}/remediator-log-shippers/cgroup.procs failed with EBUSY' in outcome.message
    assert "leaf cgroups only" in outcome.message
    assert outcome.message.endswith(f"removed {v2.root}/remediator-log-shippers")
    assert not (v2.root / "remediator-log-shippers").exists()
    assert v2.procs.cgroup(PID) == SERVICE
    assert executor.active() == []


def test_cpuset_missing_from_the_v2_tree_is_said_plainly(host):
    v2 = host(controllers="cpu io memory pids")
    outcome = v2.executor().apply(v2.request(), ())
    assert outcome.status == "failed"
    assert f"cpuset is not available in {v2.root} (cgroup.controllers: cpu io memory pids)" in outcome.message
    assert v2.cgroupfs.calls == []


def test_rmdir_ebusy_on_restore_keeps_the_cgroup_and_says_why(host):
    v2 = host()
    executor = v2.executor()
    assert executor.apply(v2.request(), ()).status == "applied"
    v2.cgroupfs.fail("rmdir", "remediator-log-shippers", errno.EBUSY)
    [restored] = executor.restore()
    assert restored.status == "restored"
    assert v2.procs.cgroup(PID) == SERVICE
    assert restored.message.endswith(
        f"rmdir {v2.root}/remediator-log-shippers failed with EBUSY: the cgroup still holds processes or child cgroups; move them out first"
    )


def test_dry_run_describes_the_v2_change_and_writes_nothing(host):
    v2 = host()
    outcome = v2.executor(dry_run=True).apply(v2.request(), ())
    assert outcome.status == "would-apply"
    assert outcome.message.startswith(f'write "+cpuset" to {v2.root}/cgroup.subtree_control; mkdir ')
    assert v2.cgroupfs.calls == []
    assert not v2.journal_path.exists()


def test_process_gone_before_the_move_is_gone_and_leaves_no_cgroup(host):
    v2 = host()
    executor = v2.executor()
    # The process exits between the plan and the write to cgroup.procs: the kernel answers ESRCH.
    original_write = v2.cgroupfs.write

    def exit_then_write(path, value):
        if path.name == "cgroup.procs":
            shutil.rmtree(v2.procs.root / str(PID))
        original_write(path, value)

    v2.cgroupfs.write = exit_then_write
    outcome = executor.apply(v2.request(), ())
    assert outcome.status == "gone", outcome
    assert not (v2.root / "remediator-log-shippers").exists()
    assert executor.active() == []
    assert [entry.state for entry in executor.journal.entries()] == ["dropped"]


def test_an_unreadable_cgroup_file_is_a_failed_outcome_not_a_traceback(host):
    v2 = host(parent="/remediator.slice")
    v2.cgroupfs.make_cgroup("/remediator.slice")
    v2.cgroupfs.fail("read", "cgroup.procs", errno.EACCES)
    executor = v2.executor()
    outcome = executor.apply(v2.request(), ())
    assert outcome.status == "failed"
    assert outcome.message == f"cannot read {v2.root}/remediator.slice/cgroup.procs: Permission denied: nothing changed"
    assert v2.cgroupfs.calls == [] and executor.journal.entries() == []


POLICY = """\
[[policy]]
name = "log-shippers"
description = "log shippers"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { above = "2ms" }
offender = { cpu = 0.5 }
[[policy.actions]]
cpuset = { cpus = "unprotected", cgroup = "log-shippers" }
"""


def test_check_host_says_not_available_where_the_v2_tree_offers_no_cpuset(host, tmp_path, capsys, monkeypatch):
    """A host found through its mountinfo, as the daemon finds it: cpuset in the root's
    cgroup.controllers, then not."""
    from helpers.policy_procs import add_process, check_host_argv, make_proc_root
    from remediator.actuators import cpuset as cpuset_module
    from remediator.cgroupfs import discover_mounts
    from remediator.cli import main

    v2 = host()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"29 23 0:26 / {v2.root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    monkeypatch.setattr(cpuset_module, "discover_mounts", lambda: discover_mounts(mountinfo, v2.cgroupfs))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "shippers.toml").write_text(POLICY)
    (tmp_path / "host").mkdir()
    proc = make_proc_root(tmp_path / "host")
    add_process(proc, 100, "victim", exe="/usr/bin/victim")
    argv = check_host_argv(tmp_path, monkeypatch, proc, tmp_path / "policies")

    assert main(argv) == 0
    assert "not available" not in capsys.readouterr().out

    (v2.root / "cgroup.controllers").write_text("cpu io memory pids\n")  # cpuset bound to v1, or not built
    assert main(argv) == 0
    [warning] = [line for line in capsys.readouterr().out.splitlines() if "not available" in line]
    assert warning == (f"{tmp_path / 'policies' / 'shippers.toml'}:9:1: warning: policy log-shippers: cpuset unprotected in "
                       f"cgroup log-shippers is not available on this host: the cgroup v2 tree at {v2.root} does not list "
                       "cpuset in cgroup.controllers (it lists: cpu io memory pids); the daemon's step fails and the ladder "
                       "goes on after its settle")
