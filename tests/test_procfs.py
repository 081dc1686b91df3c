"""ProcFS on fake /proc trees: the process list, exe, cmdline (split as psutil splits it), uids, parents,
its PROCFS_PATH pointed at the tree only for the call, and its errors mapped to ours."""

from __future__ import annotations

import os
import subprocess
import shutil
import sys

import psutil
import pytest

from remediator.errors import ProcessGone, RemediatorError
from remediator.procfs import ProcFS

from helpers.fakeproc import FakeProc, FakeProcess
from helpers.policy_procs import add_process, make_proc_root


@pytest.fixture
def proc(tmp_path):
    root = make_proc_root(tmp_path)
    add_process(root, 1, "systemd", ppid=0, start=1)
    add_process(root, 300, "bash", ppid=1, start=500)
    add_process(root, 400, "fluent-bit", ppid=300, start=900, uid=104, exe="/usr/bin/fluent-bit (deleted)",
                cmdline=("/usr/bin/fluent-bit", "-c", "/etc/fluent-bit.conf"))
    return root


def test_process_info_reads_exe_cmdline_uid_and_ancestors(proc):
    info = ProcFS(proc).process_info(400)
    assert (info.pid, info.start_time, info.comm) == (400, 900, "fluent-bit")
    assert info.exe == "/usr/bin/fluent-bit"  # " (deleted)" dropped: the binary was replaced by an upgrade
    assert info.cmdline == ("/usr/bin/fluent-bit", "-c", "/etc/fluent-bit.conf")
    assert (info.uid, info.ppid) == (104, 300)
    assert info.ancestors == ((300, "bash"),)  # PID 1 excluded


def test_a_title_rewritten_with_spaces_is_split_into_arguments(proc):
    (proc / "400" / "cmdline").write_text("fluent-bit: worker process")  # setproctitle: no NUL at the end
    assert ProcFS(proc).cmdline(400) == ("fluent-bit:", "worker", "process")


def test_no_exe_link_reads_as_empty(proc):
    add_process(proc, 500, "kworker/0:1", ppid=1, start=950)
    assert ProcFS(proc).exe(500) == ""


def test_the_parent_chain_stops_at_a_parent_started_after_its_child(proc):
    # 300's pid was reused by a process started after 400: it is not 400's parent.
    add_process(proc, 600, "api", ppid=400, start=2000)
    (proc / "300" / "stat").write_text((proc / "300" / "stat").read_text().replace(" 500 ", " 1500 ", 1))
    assert (proc / "300" / "stat").read_text().split()[21] == "1500"
    assert ProcFS(proc).ancestors(400) == ((400, "fluent-bit"),)


def test_pids_lists_the_tree_and_psutil_is_pointed_back(proc):
    before = psutil.PROCFS_PATH
    assert ProcFS(proc).pids() == [1, 300, 400]
    assert psutil.PROCFS_PATH == before


def test_a_vanished_process_is_gone_and_psutil_is_pointed_back(proc):
    before = psutil.PROCFS_PATH
    for read in (ProcFS(proc).cmdline, ProcFS(proc).uid, ProcFS(proc).exe, ProcFS(proc).process_info):
        with pytest.raises(ProcessGone):
            read(777)
    assert psutil.PROCFS_PATH == before


def test_a_zombie_reads_as_no_exe_and_no_arguments(proc):
    add_process(proc, 700, "defunct", ppid=1, start=990, cmdline=())
    stat = proc / "700" / "stat"
    stat.write_text(stat.read_text().replace(") S ", ") Z ", 1))
    info = ProcFS(proc).process_info(700)
    assert (info.exe, info.cmdline) == ("", ())


def test_thread_count_of_a_real_process_follows_its_threads():
    import threading

    procfs, release = ProcFS(), threading.Event()
    before = procfs.thread_count(os.getpid())
    assert before == procfs.stat(os.getpid()).num_threads
    threads = [threading.Thread(target=release.wait) for _ in range(5)]
    try:
        for thread in threads:
            thread.start()
        assert procfs.thread_count(os.getpid()) == before + 5 == procfs.stat(os.getpid()).num_threads
    finally:
        release.set()
        for thread in threads:
            thread.join()


def test_thread_count_in_a_tree_counts_task_entries_or_falls_back_to_stat(proc, tmp_path):
    add_process(proc, 500, "worker", ppid=1, start=1000, threads={500: (0, "0-1"), 501: (0, "0-1"), 502: (0, "0-1")})
    procfs = ProcFS(proc)
    assert procfs.thread_count(500) == 3
    shutil.rmtree(proc / "500" / "task")  # a tree without task entries: stat's num_threads says
    assert procfs.thread_count(500) == 3
    shutil.rmtree(proc / "500")
    with pytest.raises(ProcessGone):
        procfs.thread_count(500)


def test_recent_pids_is_the_last_listing_while_it_is_recent_enough(proc):
    procfs = ProcFS(proc)
    assert procfs.recent_pids(60.0) is None  # nothing listed yet
    listed = procfs.pids()
    assert procfs.recent_pids(60.0) == listed
    add_process(proc, 500, "newcomer", ppid=1, start=1000)
    assert 500 not in procfs.recent_pids(60.0)  # the listing as it was, not /proc now
    assert procfs.recent_pids(-1.0) is None  # too old for the caller
    assert 500 in procfs.pids()


def test_a_process_infos_kept_hash_follows_equality():
    import dataclasses

    from remediator.procfs import ProcessInfo

    info = ProcessInfo(pid=7, start_time=100, comm="api", cmdline=("api", "--port", "80"), ancestors=((1, "init"),))
    same = ProcessInfo(pid=7, start_time=100, comm="api", cmdline=("api", "--port", "80"), ancestors=((1, "init"),))
    renamed = dataclasses.replace(info, comm="api-worker")
    assert hash(info) == hash(info) == hash(same) and info == same
    assert {info: 1}[same] == 1 and renamed not in {info: 1}
    assert hash(dataclasses.replace(renamed, comm="api")) == hash(info)


def test_cmdline_splits_as_psutil_does():
    from remediator.procfs import split_cmdline

    assert split_cmdline("") == []
    assert split_cmdline("/usr/bin/vector\0--config\0/etc/vector.toml\0") == ["/usr/bin/vector", "--config", "/etc/vector.toml"]
    assert split_cmdline("nginx: worker process") == ["nginx:", "worker", "process"]  # setproctitle, no NUL
    assert split_cmdline("postgres: checkpointer \0") == ["postgres:", "checkpointer", ""]  # one NUL after a spaced title
    assert split_cmdline("a\0\0b\0") == ["a", "", "b"]  # an empty argument stays (cmdline() drops empties)
    child = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (os.getpid(), child.pid):  # and on real processes, as psutil reads them
            assert ProcFS().cmdline(pid) == tuple(part for part in psutil.Process(pid).cmdline() if part)
            assert ProcFS().exe(pid) == psutil.Process(pid).exe()
    finally:
        child.kill()
        child.wait()


def test_only_the_first_32_kib_of_a_long_command_line_are_read_and_kept():
    """A process's arguments can be a quarter of its stack limit, and its forked children share
    them at no cost to it: the daemon reads 32 KiB of them, still split on their NULs."""
    from remediator.procfs import CMDLINE_MAX_BYTES, bounded_cmdline

    program = [sys.executable, "-c", "import time; time.sleep(30)"]
    child = subprocess.Popen([*program, "a" * 20000, "b" * 20000, "c" * 20000])
    try:
        arguments = ProcFS().cmdline(child.pid)
    finally:
        child.kill()
        child.wait()
    assert arguments[:4] == (*program, "a" * 20000)
    before = sum(len(part.encode()) + 1 for part in arguments[:4])
    assert arguments[4:] == ("b" * (CMDLINE_MAX_BYTES - before),)  # cut, and still split on its NULs
    assert bounded_cmdline(b"x" * (CMDLINE_MAX_BYTES + 1)) == b"x" * CMDLINE_MAX_BYTES  # a title: no NUL to keep
    assert bounded_cmdline(b"short\0") == b"short\0"


def test_uids_come_from_the_uid_line_wherever_it_is(tmp_path):
    status = tmp_path / "proc" / "42"
    status.mkdir(parents=True)
    procfs = ProcFS(tmp_path / "proc")
    (status / "status").write_text("Name:\tapi\nUmask:\t0022\nUid:\t1000\t1001\t1000\t1000\nGid:\t5\t5\t5\t5\n")
    assert procfs.uids(42) == (1000, 1001)
    (status / "status").write_text("Uid:\t7\t8\t7\t7")  # first and last line, no newline
    assert procfs.uids(42) == (7, 8)
    (status / "status").write_text("Name:\tapi\nGid:\t5\t5\t5\t5\n")
    with pytest.raises(RemediatorError, match="no Uid line"):
        procfs.uids(42)
    assert ProcFS().uids(os.getpid()) == (os.getuid(), os.geteuid())


def test_a_user_name_is_looked_up_once_a_minute(monkeypatch):
    """Every new process is named by its user; the password database is read once per uid per
    USER_NAME_KEPT_S, so a user added or renamed shows within that."""
    import types

    from remediator import procfs as procfs_module

    names = {4242: "alice"}
    lookups = []

    def getpwuid(uid):
        lookups.append(uid)
        if uid not in names:
            raise KeyError(uid)
        return types.SimpleNamespace(pw_name=names[uid])

    now = [1000.0]
    monkeypatch.setattr(procfs_module.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(procfs_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(procfs_module, "_user_names", {})
    assert [procfs_module._user_name(4242) for _ in range(3)] == ["alice"] * 3 and lookups == [4242]
    assert procfs_module._user_name(4343) == "4343"  # no such user: its uid
    names[4242] = "alice2"
    now[0] += procfs_module.USER_NAME_KEPT_S
    assert procfs_module._user_name(4242) == "alice2" and lookups == [4242, 4343, 4242]


def test_a_sketch_reads_stat_exe_cmdline_and_ancestors_only(tmp_path):
    """ProcFS.sketch: what policies matching on comm, exe, cmdline and ancestors need, without the
    cgroup and status files every full reading opens."""
    proc = FakeProc(tmp_path / "proc")
    proc.add(FakeProcess(300, "sh", ppid=1, start_time=30))
    proc.add(FakeProcess(400, "xz", ppid=300, start_time=40, uid=1000, cmdline=("xz", "-9"), cgroup_v2="/system.slice/x.service"))
    proc.write()
    opened: list[str] = []

    class Counting(ProcFS):
        def _read(self, pid, name, tid=None):
            opened.append(name)
            return super()._read(pid, name, tid)

    procfs = Counting(proc.root)
    sketch = procfs.sketch(400)
    assert (sketch.pid, sketch.start_time, sketch.comm, sketch.cmdline, sketch.ancestors) == \
        (400, 40, "xz", ("xz", "-9"), ((300, "sh"),))
    assert (sketch.uid, sketch.user, sketch.cgroup, sketch.unit) == (-1, "", "", "")  # not read
    assert sorted(opened) == ["stat", "stat"]  # its own and its parent's: no cgroup, no status
    full = procfs.process_info(400)
    assert (full.uid, full.cgroup) == (1000, "/system.slice/x.service")
    assert "cgroup" in opened and "status" in opened
