"""Protected-set selectors against a fake /proc tree."""

from __future__ import annotations

from remediator.procfs import ProcFS
from remediator.selectors import ProtectSelectors, normalize_cgroup_path

from helpers.fakeproc import FakeProc, FakeProcess, FakeThread


def build(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(1, "init"))
    proc.add(FakeProcess(2, "kthreadd", ppid=0, flags=0x00200000))
    proc.add(FakeProcess(10, "nginx", cgroup_v2="/system.slice/nginx.service", threads=[FakeThread(10), FakeThread(11)]))
    proc.add(FakeProcess(20, "nginx-worker-with-a-long-name"[:15], ppid=10, cgroup_v2="/system.slice/nginx.service"))
    proc.add(FakeProcess(30, "fluent-bit", cgroup_v2="/system.slice/fluent-bit.service"))
    proc.add(FakeProcess(40, "api", cgroup_v2="/", cgroup_v1={"name=systemd": "/system.slice/api.service", "cpuset": "/"}))
    proc.add(FakeProcess(50, "nginx", ppid=2, flags=0x00200000))  # a kernel thread that happens to share the name
    return ProcFS(proc.write())


def test_comm_glob(tmp_path):
    procfs = build(tmp_path)
    assert set(ProtectSelectors.build(comms=["nginx*"]).resolve(procfs)) == {10, 20}


def test_pid_only_reads_just_that_process(tmp_path):
    procfs = build(tmp_path)
    assert set(ProtectSelectors.build(pids=[30, 999]).resolve(procfs)) == {30}


def test_cgroup_path_matches_the_cgroup_and_below(tmp_path):
    procfs = build(tmp_path)
    assert set(ProtectSelectors.build(cgroups=["/sys/fs/cgroup/system.slice/nginx.service"]).resolve(procfs)) == {10, 20}
    assert set(ProtectSelectors.build(cgroups=["/system.slice"]).resolve(procfs)) == {10, 20, 30, 40}


def test_unit_on_v2_and_on_v1_name_systemd(tmp_path):
    procfs = build(tmp_path)
    assert set(ProtectSelectors.build(units=["fluent-bit"]).resolve(procfs)) == {30}
    assert set(ProtectSelectors.build(units=["api.service"]).resolve(procfs)) == {40}


def test_kernel_threads_are_never_protected(tmp_path):
    procfs = build(tmp_path)
    assert 50 not in ProtectSelectors.build(comms=["nginx"]).resolve(procfs)


def test_reason_names_the_selector(tmp_path):
    procfs = build(tmp_path)
    info = procfs.process_info(30)
    assert ProtectSelectors.build(comms=["fluent*"]).match_reason(info) == "comm fluent*"
    assert ProtectSelectors.build(pids=[30]).match_reason(info) == "pid 30"


def test_normalize_cgroup_path():
    assert normalize_cgroup_path("/sys/fs/cgroup/unified/a/b/") == "/a/b"
    assert normalize_cgroup_path("/sys/fs/cgroup/cpuset") == "/"
    assert normalize_cgroup_path("system.slice/x.service") == "/system.slice/x.service"
