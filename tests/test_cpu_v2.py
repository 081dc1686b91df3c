"""cpu_weight, cpu_idle and cpu_max on cgroup v2 without systemd, against a fake cgroupfs tree with
kernel-like rules (tests/helpers/fake_cgroupfs.py): the offender moves into remediator-POLICY under
the root, after "+cpu" in the root's subtree_control, with cpu.weight / cpu.idle / cpu.max written
there; never a raise; a revert moves it back and removes the group. This host binds cpu to its v1
hierarchy; the real v2 proof runs in the guests (tests/guest/test_cpu_owned.py)."""

from __future__ import annotations

import errno

import pytest

from helpers.fake_cgroupfs import FakeCgroupV2, FakeProcTree
from remediator.actuators import CpuActuator
from remediator.executor import Executor
from remediator.model import ActionRequest
from remediator.journal import Journal
from remediator.procfs import ProcessIdentity, ProcFS

# Beyond PID_MAX_LIMIT (4194304): no real process can ever have these ids.
PID, START = 5_000_001, 777
OTHER = 5_000_010
CGROUP = "/jobs/compress"  # a group some tool made; no manager owns the tree
GROUP = "remediator-log-shippers"
WEIGHT_10 = (("weight", 10),)
IDLE = (("idle", 1),)
QUOTA_20 = (("quota_us", 20_000), ("period_us", 100_000))


class V2Host:
    def __init__(self, tmp_path, controllers="cpuset cpu io memory pids"):
        self.procs = FakeProcTree(tmp_path / "proc")
        self.cgroupfs = FakeCgroupV2(tmp_path / "cgroup", self.procs, controllers=controllers)
        self.procs.add_process(PID, START, cgroup=CGROUP, tids=(PID + 1,))
        self.cgroupfs.make_cgroup("/jobs")
        self.cgroupfs.make_cgroup(CGROUP, pids=[PID])
        self.procfs = ProcFS(tmp_path / "proc")
        self.journal_path = tmp_path / "journal.jsonl"
        self.journals: list[Journal] = []
        self.root = self.cgroupfs.root
        self.group = self.root / GROUP

    def actuator(self) -> CpuActuator:
        return CpuActuator(self.procfs, mount=self.cgroupfs.mount, cgroupfs=self.cgroupfs, systemd=None)

    def executor(self, *, dry_run: bool = False) -> Executor:
        journal = None
        if not dry_run:
            journal = Journal(self.journal_path)
            self.journals.append(journal)
        return Executor(journal, self.procfs, dry_run=dry_run, actuators={"cpu": self.actuator()}, self_pid=0)

    def file(self, name: str) -> str:
        return (self.group / name).read_text().strip()


def request(setting: tuple, step: int = 0, pid: int = PID, start: int = START) -> ActionRequest:
    return ActionRequest(ProcessIdentity(pid, start), "cpu", "log-shippers", step, {"cpu": dict(setting), "group": "log-shippers"})


@pytest.fixture
def host(tmp_path):
    made: list[V2Host] = []

    def build(**options) -> V2Host:
        made.append(V2Host(tmp_path, **options))
        return made[-1]

    yield build
    for each in made:
        for journal in each.journals:
            journal.close()


def test_weight_then_idle_enable_cpu_move_the_process_and_revert_removes_the_group(host):
    v2 = host()
    root, group = v2.root, v2.group
    executor = v2.executor()

    weight = executor.apply(request(WEIGHT_10), ())

    assert weight.status == "applied", weight
    assert weight.message == (
        f"write +cpu to {root}/cgroup.subtree_control, mkdir {group}, write 10 to {group}/cpu.weight, "
        f"write {PID} to {group}/cgroup.procs (was {CGROUP})"
    )
    assert "cpu" in (root / "cgroup.subtree_control").read_text().split()
    assert v2.procs.cgroup(PID) == f"/{GROUP}"
    assert v2.file("cpu.weight") == "10"

    idle = executor.apply(request(IDLE, step=1), ())
    assert idle.status == "applied", idle
    assert idle.message == f"write 1 to {group}/cpu.idle (was /{GROUP})"
    assert v2.file("cpu.idle") == "1"
    [entry] = executor.active()
    assert entry.original["cgroup"] == CGROUP  # the first step's original is kept
    assert entry.original["version"] == 2

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert restored.message == (f"write {PID} to {root}/jobs/compress/cgroup.procs (was /{GROUP}); removed {group}; "
                                f"write -cpu to {root}/cgroup.subtree_control (as before remediator)")
    assert v2.procs.cgroup(PID) == CGROUP
    assert v2.cgroupfs.pids_in(CGROUP) == [PID]
    assert not group.exists()
    assert "cpu" not in (root / "cgroup.subtree_control").read_text().split()
    assert not (root / "jobs" / "cpu.weight").exists()
    assert executor.active() == []


def test_plus_cpu_stays_where_something_made_since_uses_it(host):
    v2 = host()
    root = v2.root
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    (root / "jobs" / "cpu.weight").write_text("50\n")  # an operator weighs /jobs since

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    assert restored.message.endswith(f"removed {v2.group}; +cpu stays in {root}/cgroup.subtree_control ({root}/jobs uses it)")
    assert "cpu" in (root / "cgroup.subtree_control").read_text().split()


def test_plus_cpu_that_was_there_before_is_left_alone(host):
    v2 = host()
    root = v2.root
    v2.cgroupfs.write(root / "cgroup.subtree_control", "+cpu")
    executor = v2.executor()
    applied = executor.apply(request(WEIGHT_10), ())
    assert applied.status == "applied" and "+cpu" not in applied.message

    [restored] = executor.restore()

    assert restored.message.endswith(f"removed {v2.group}"), restored
    assert "cpu" in (root / "cgroup.subtree_control").read_text().split()


def test_a_failed_move_takes_back_plus_cpu_with_the_new_group(host):
    v2 = host()
    root = v2.root
    v2.cgroupfs.fail("write", "cgroup.procs", errno.EIO)  # fails after +cpu, the mkdir and cpu.idle

    failed = v2.executor().apply(request(IDLE), ())

    assert failed.status == "failed", failed
    assert failed.message.endswith(f"; removed {v2.group}; write -cpu to {root}/cgroup.subtree_control (as before remediator)"), failed
    assert not v2.group.exists()
    assert "cpu" not in (root / "cgroup.subtree_control").read_text().split()


def test_a_group_another_process_still_holds_stays_and_so_does_plus_cpu(host):
    v2 = host()
    root = v2.root
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    v2.procs.add_process(OTHER, 1, comm="fluent-bit", cgroup=f"/{GROUP}")
    v2.cgroupfs.place(f"/{GROUP}", OTHER)  # a second offender of the policy, moved in since

    [restored] = executor.restore()

    assert restored.status == "restored", restored
    # No "removed", and "+cpu" is not even weighed while our group is left: nothing about it is said.
    assert restored.message == f"write {PID} to {root}/jobs/compress/cgroup.procs (was /{GROUP})"
    assert v2.cgroupfs.pids_in(f"/{GROUP}") == [OTHER]
    assert "cpu" in (root / "cgroup.subtree_control").read_text().split()
    assert not any(call[0] == "rmdir" or call[2] == "-cpu" for call in v2.cgroupfs.calls)


def test_a_new_group_that_cannot_be_removed_after_a_failed_move_keeps_plus_cpu(host):
    v2 = host()
    root = v2.root
    v2.cgroupfs.fail("write", "cgroup.procs", errno.EIO)
    v2.cgroupfs.fail("rmdir", GROUP, errno.EBUSY)

    failed = v2.executor().apply(request(IDLE), ())

    assert failed.status == "failed", failed
    assert failed.message.endswith(f"; could not remove {v2.group} (Device or resource busy)"), failed
    assert v2.group.exists()
    assert "cpu" in (root / "cgroup.subtree_control").read_text().split()
    assert not any(call[2] == "-cpu" for call in v2.cgroupfs.calls)


def test_cpu_max_is_one_write_of_quota_and_period(host):
    v2 = host()
    outcome = v2.executor().apply(request(QUOTA_20), ())
    assert outcome.status == "applied", outcome
    assert f"write 20000 100000 to {v2.group}/cpu.max" in outcome.message
    assert v2.file("cpu.max") == "20000 100000"


def test_never_a_raise_weight_quota_and_idle(host):
    v2 = host()
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    higher = executor.apply(request((("weight", 50),), step=1), ())
    assert higher.status == "unchanged", higher
    assert v2.file("cpu.weight") == "10"

    assert executor.apply(request(QUOTA_20, step=2), ()).status == "applied"
    looser = executor.apply(request((("quota_us", 50_000), ("period_us", 100_000)), step=3), ())
    assert looser.status == "unchanged", looser
    assert v2.file("cpu.max") == "20000 100000"

    assert executor.apply(request(IDLE, step=4), ()).status == "applied"
    # An idle group keeps idle: the kernel would refuse a weight there, and idle is less.
    assert executor.apply(request((("weight", 5),), step=5), ()).status == "unchanged"
    assert v2.file("cpu.idle") == "1"
    executor.restore()
    assert not v2.group.exists()


def test_a_cgroup_that_already_gives_as_little_keeps_the_process(host):
    v2 = host()
    v2.cgroupfs.write(v2.root / "cgroup.subtree_control", "+cpu")
    v2.cgroupfs.write(v2.root / "jobs" / "cpu.weight", "5")
    v2.cgroupfs.calls.clear()

    outcome = v2.executor().apply(request(WEIGHT_10), ())

    assert outcome.status == "unchanged", outcome
    assert f"cpu.weight=5 in {v2.root}/jobs" in outcome.message
    assert v2.procs.cgroup(PID) == CGROUP
    assert v2.cgroupfs.calls == []


def test_a_process_under_limits_is_not_moved_out_of_them(host):
    v2 = host()
    (v2.root / "jobs" / "memory.max").write_text("536870912\n")  # the memory controller's limit on its parent

    executor = v2.executor()
    outcome = executor.apply(request(WEIGHT_10), ())

    assert outcome.status == "invalid", outcome
    assert f"{v2.root}/jobs/memory.max='536870912'" in outcome.message
    assert v2.cgroupfs.calls == []
    assert v2.procs.cgroup(PID) == CGROUP
    assert executor.active() == []


def test_a_group_holding_a_protected_process_is_never_changed(host):
    v2 = host()
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    # Someone put another process into our group; it is protected now.
    v2.procs.add_process(OTHER, 1, comm="api", cgroup=f"/{GROUP}")
    v2.cgroupfs.place(f"/{GROUP}", OTHER)
    v2.cgroupfs.calls.clear()

    outcome = executor.apply(request(IDLE, step=1), protected_pids=(OTHER,))

    assert outcome.status == "refused", outcome
    assert f"pid {OTHER}" in outcome.message
    assert v2.file("cpu.idle") == "0"
    assert v2.cgroupfs.calls == []


def test_another_users_offender_in_our_own_group_does_not_stop_the_next_step(host):
    """remediator's own group holds what one policy placed there, whoever runs it: only a group
    someone else made (a unit) must hold the offender's user alone (tests/test_cpuset_systemd.py)."""
    v2 = host()
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    v2.procs.add_process(OTHER, 1, comm="fluent-bit", cgroup=f"/{GROUP}", uid=1000)
    v2.cgroupfs.place(f"/{GROUP}", OTHER)

    outcome = executor.apply(request(IDLE, step=1), ())

    assert outcome.status == "applied", outcome
    assert v2.file("cpu.idle") == "1"


def test_another_users_offender_gets_a_group_of_its_own_and_its_steps_stay_there(host):
    """A group's setting reaches every process in it: a local user's look-alike of the shipper,
    escalated to cpu_idle, must not idle root's real one, so each user's offenders get their own
    group (placement.per_user_name) and the revert removes both."""
    v2 = host()
    v2.procs.add_process(OTHER, 1, comm="fluent-bit", cgroup=CGROUP, uid=1000)
    v2.cgroupfs.place(CGROUP, OTHER)
    executor = v2.executor()
    theirs = v2.root / f"{GROUP}.uid1000"

    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    first = executor.apply(request(WEIGHT_10, pid=OTHER, start=1), ())
    idle = executor.apply(request(IDLE, step=1, pid=OTHER, start=1), ())

    assert first.status == "applied" and idle.status == "applied", (first, idle)
    assert f"write {OTHER} to {theirs / 'cgroup.procs'}" in first.message
    assert (theirs / "cgroup.procs").read_text().split() == [str(OTHER)]
    assert (theirs / "cpu.idle").read_text().strip() == "1"
    assert (v2.group / "cgroup.procs").read_text().split() == [str(PID)]
    assert v2.file("cpu.idle") == "0" and v2.file("cpu.weight") == "10", "root's group keeps its own step"

    restored = executor.restore()
    assert [outcome.status for outcome in restored] == ["restored", "restored"], restored
    assert not theirs.exists() and not v2.group.exists()


def test_a_process_that_changes_its_uid_keeps_the_group_it_was_placed_in(host):
    """A later step adds to the earlier ones: moved into another user's group it would lose them
    (cpu_max there without the cpu_idle of the first), so it stays where it was placed."""
    v2 = host()
    executor = v2.executor()
    assert executor.apply(request(IDLE), ()).status == "applied"
    status = v2.procs.root / str(PID) / "status"
    status.write_text(status.read_text().replace("Uid:\t0\t0\t0\t0", "Uid:\t1000\t1000\t1000\t1000"))

    outcome = executor.apply(request(QUOTA_20, step=1), ())

    assert outcome.status == "applied", outcome
    assert v2.procs.cgroup(PID) == f"/{GROUP}" and not (v2.root / f"{GROUP}.uid1000").exists()
    assert v2.file("cpu.idle") == "1" and v2.file("cpu.max") == "20000 100000"


def test_a_group_named_like_ours_deeper_down_is_not_ours(host):
    """A container root (or a user with a delegated subtree) can name a group of its own
    `remediator-log-shippers`: a look-alike started there is still its user's offender, and goes
    into its user's group, not into root's."""
    v2 = host()
    v2.cgroupfs.make_cgroup(f"/jobs/{GROUP}")
    v2.procs.add_process(OTHER, 1, comm="fluent-bit", cgroup=f"/jobs/{GROUP}", uid=1000)
    v2.cgroupfs.place(f"/jobs/{GROUP}", OTHER)
    executor = v2.executor()

    outcome = executor.apply(request(IDLE, pid=OTHER, start=1), ())

    assert outcome.status == "applied", outcome
    assert v2.procs.cgroup(OTHER) == f"/{GROUP}.uid1000"
    assert not v2.group.exists()


def test_a_child_born_in_roots_group_that_runs_as_another_user_gets_that_users_group(host):
    """A root offender's child inherits root's group; one that then runs as another user (a job
    runner's) and is stepped itself goes into its user's group: no step of its reaches root's."""
    v2 = host()
    executor = v2.executor()
    assert executor.apply(request(WEIGHT_10), ()).status == "applied"
    v2.procs.add_process(OTHER, 1, comm="fluent-bit", cgroup=f"/{GROUP}", uid=1000)
    v2.cgroupfs.place(f"/{GROUP}", OTHER)

    outcome = executor.apply(request(IDLE, pid=OTHER, start=1), ())

    assert outcome.status == "applied", outcome
    assert v2.procs.cgroup(OTHER) == f"/{GROUP}.uid1000"
    assert v2.file("cpu.idle") == "0", "root's group keeps its own step"


def test_no_cpu_controller_on_the_tree_is_said_plainly(host):
    v2 = host(controllers="cpuset io memory pids")  # cpu bound elsewhere: discovery finds no cpu hierarchy
    journal = Journal(v2.journal_path)
    v2.journals.append(journal)
    actuator = CpuActuator(v2.procfs, mount=None, cgroupfs=v2.cgroupfs)
    executor = Executor(journal, v2.procfs, dry_run=False, actuators={"cpu": actuator}, self_pid=0)
    outcome = executor.apply(request(WEIGHT_10), ())
    assert outcome.status == "failed", outcome
    assert outcome.message.startswith("no cpu controller here")
    assert v2.cgroupfs.calls == []


def test_ebusy_on_the_move_is_explained_and_the_new_group_removed(host):
    v2 = host()
    v2.cgroupfs.fail("write", "cgroup.procs", errno.EBUSY)
    executor = v2.executor()

    outcome = executor.apply(request(WEIGHT_10), ())

    assert outcome.status == "failed", outcome
    assert f"write \"{PID}\" to {v2.group}/cgroup.procs failed with EBUSY" in outcome.message
    assert outcome.message.endswith(f"removed {v2.group}; write -cpu to {v2.root}/cgroup.subtree_control (as before remediator)")
    assert not v2.group.exists()
    assert v2.procs.cgroup(PID) == CGROUP
    assert executor.active() == []


def test_a_crash_before_the_move_restores_nothing_and_removes_the_empty_group(host):
    v2 = host()
    actuator = v2.actuator()
    identity = ProcessIdentity(PID, START)
    original = actuator.read(PID)
    plan = actuator.plan(identity, request(WEIGHT_10).target(), original)
    # What a daemon killed after the mkdir and before the move leaves: the intent and an empty group.
    v2.cgroupfs.write(v2.root / "cgroup.subtree_control", "+cpu")
    v2.cgroupfs.mkdir(v2.group)

    restored = actuator.restore(identity, original, None, planned=plan.expected)

    assert restored.restored, restored
    assert restored.message == (f"pid {PID} is in its original cgroup {CGROUP}: nothing to restore; removed {v2.group}; "
                                f"write -cpu to {v2.root}/cgroup.subtree_control (as before remediator)")
    assert not v2.group.exists()


def test_dry_run_names_every_file_and_value_and_writes_nothing(host):
    v2 = host()
    outcome = v2.executor(dry_run=True).apply(request(IDLE), ())
    assert outcome.status == "would-apply", outcome
    assert outcome.message == (
        f"write +cpu to {v2.root}/cgroup.subtree_control, mkdir {v2.group}, write 1 to {v2.group}/cpu.idle, "
        f"write {PID} to {v2.group}/cgroup.procs (was {CGROUP})"
    )
    assert v2.cgroupfs.calls == []
    assert not v2.journal_path.exists()


# -- policy explain and policy check --host --------------------------------------------------------

POLICY = """
[[policy]]
name = "log-shippers"
description = "the shipper gets less CPU"
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { above = "2ms" }
offender = { cpu = 0.5 }
[[policy.actions]]
cpu_weight = 10
"""


def load_policy(tmp_path):
    from remediator.policy import load_policies

    path = tmp_path / "policies" / "shippers.toml"
    path.parent.mkdir()
    path.write_text(POLICY)
    [policy] = load_policies([path.parent]).policies
    return policy


def test_explain_names_the_exact_files_and_values_without_systemd(host, tmp_path, monkeypatch):
    from remediator.actuators import Host, cpu as cpu_kind
    from remediator.explain import first_step_effect

    v2 = host()
    policy = load_policy(tmp_path)
    monkeypatch.setattr(cpu_kind, "discover_cpu_mount", lambda: v2.cgroupfs.mount)
    here = Host(v2.procfs, systemd_host=False, request_cpus=frozenset(), online_cpus=frozenset(range(4)))

    text, _ = first_step_effect(policy.steps[0], policy, PID, here)

    assert text == (
        f"cpu_weight 10: write +cpu to {v2.root}/cgroup.subtree_control, mkdir {v2.group}, write 10 to {v2.group}/cpu.weight, "
        f"write {PID} to {v2.group}/cgroup.procs (was {CGROUP}) (cgroup v2 without systemd: a group of remediator's own)"
    )
    assert "not available" not in text
    assert v2.cgroupfs.calls == []  # read only

    monkeypatch.setattr(cpu_kind, "discover_cpu_mount", lambda: None)
    text, _ = first_step_effect(policy.steps[0], policy, PID, here)
    assert text.startswith("not available on this host: no cgroup cpu controller is mounted")


def test_check_host_says_not_available_only_where_no_cpu_controller_exists(host, tmp_path, capsys, monkeypatch):
    from helpers.policy_procs import add_process, check_host_argv, make_proc_root
    from remediator.cli import main
    from remediator.actuators import cpu as cpu_kind_module

    v2 = host()
    load_policy(tmp_path)
    (tmp_path / "host").mkdir()
    proc = make_proc_root(tmp_path / "host")
    add_process(proc, 100, "victim", exe="/usr/bin/victim")
    argv = check_host_argv(tmp_path, monkeypatch, proc, tmp_path / "policies")

    monkeypatch.setattr(cpu_kind_module, "discover_cpu_mount", lambda: v2.cgroupfs.mount)  # v2, no systemd
    assert main(argv) == 0
    assert "not available" not in capsys.readouterr().out

    monkeypatch.setattr(cpu_kind_module, "discover_cpu_mount", lambda: None)
    assert main(argv) == 0
    [warning] = [line for line in capsys.readouterr().out.splitlines() if "not available" in line]
    assert warning.startswith(f"{tmp_path / 'policies' / 'shippers.toml'}:10:1: warning: policy log-shippers: cpu_weight 10 is "
                              "not available on this host: no cgroup cpu controller is mounted")


def test_the_shipped_ladder_shape_cpu_idle_then_a_cpuset_of_the_same_name_share_one_group_and_leave_none(host):
    """log-shippers: cpu_idle, then cpuset {cgroup = "log-shippers"}; without systemd both name
    /remediator-log-shippers on the one v2 tree: the cpuset step sets its CPUs on the group the
    process is already in, and the revert (newest first) leaves the process where it was and no group."""
    from helpers.faults import FakeThreads
    from remediator.actuators import CpusetActuator

    v2 = host()
    threads = FakeThreads(frozenset(range(4)))
    for tid in (PID, PID + 1):
        threads.add(tid)
    cpuset = CpusetActuator(v2.procfs, mount=v2.cgroupfs.mount, cgroupfs=v2.cgroupfs, syscalls=threads)
    journal = Journal(v2.journal_path)
    v2.journals.append(journal)
    executor = Executor(journal, v2.procfs, dry_run=False, actuators={"cpu": v2.actuator(), "cpuset": cpuset}, self_pid=0)

    assert executor.apply(request(IDLE), ()).status == "applied"
    confine = ActionRequest(ProcessIdentity(PID, START), "cpuset", "log-shippers", 1, {"cgroup": "log-shippers", "cpus": [2, 3]})
    confined = executor.apply(confine, ())
    assert confined.status == "applied", confined
    assert v2.procs.cgroup(PID) == f"/{GROUP}"
    assert v2.file("cpuset.cpus") == "2-3" and v2.file("cpu.idle") == "1"

    restored = executor.restore()

    assert [outcome.status for outcome in restored] == ["restored", "restored"], restored
    assert v2.procs.cgroup(PID) == CGROUP
    assert not v2.group.exists()
    assert executor.active() == []


def test_a_kernel_without_cpu_idle_is_named_and_everything_given_back(host):
    v2 = host()
    root = v2.root
    v2.cgroupfs.fail("write", "cpu.idle", errno.ENOENT)  # Linux before 5.15

    failed = v2.executor().apply(request(IDLE), ())

    assert failed.status == "failed", failed
    assert "failed with ENOENT: this kernel has no cpu.idle (Linux 5.15 and later have it)" in failed.message, failed
    assert not v2.group.exists()
    assert v2.procs.cgroup(PID) == CGROUP
    assert "cpu" not in (root / "cgroup.subtree_control").read_text().split()
