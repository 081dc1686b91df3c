"""A fake procfs tree for `policy explain` tests: processes, their threads, cgroups and exe links."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_line(pid: int, comm: str, ppid: int, flags: int, nice: int, threads: int, start: int, processor: int = 0) -> str:
    # Fields 3.. of /proc/PID/stat: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime ... processor.
    fields = ["S", ppid, pid, pid, 0, -1, flags, 0, 0, 0, 0, 10, 5, 0, 0, 20, nice, threads, 0, start]
    fields += [0] * 16 + [processor] + [0] * 13  # to field 52, as kernels since 3.5 write (psutil reads 42)
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n"


def _status(comm: str, pid: int, uid: int, cpus: str) -> str:
    return f"Name:\t{comm}\nTgid:\t{pid}\nPid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nCpus_allowed_list:\t{cpus}\n"


def add_process(
    root: Path,
    pid: int,
    comm: str,
    *,
    ppid: int = 1,
    exe: str = "",
    cmdline: tuple[str, ...] = (),
    cgroup: str = "/",
    cpuset_v1: str | None = None,
    uid: int = 0,
    threads: dict[int, tuple[int, str]] | None = None,  # tid -> (nice, allowed CPU list)
    kernel_thread: bool = False,
    start: int = 1000,
) -> None:
    """Write /proc/<pid> with its task/<tid> entries. The first thread is the main one (tid == pid)."""
    threads = threads or {pid: (0, "0-1")}
    flags = 0x00200000 if kernel_thread else 0
    directory = root / str(pid)
    (directory / "task").mkdir(parents=True)
    nice, cpus = threads.get(pid, next(iter(threads.values())))
    (directory / "stat").write_text(_stat_line(pid, comm, ppid, flags, nice, len(threads), start))
    (directory / "status").write_text(_status(comm, pid, uid, cpus))
    (directory / "comm").write_text(comm + "\n")
    (directory / "cmdline").write_text("".join(arg + "\0" for arg in cmdline))
    lines = [f"0::{cgroup}"]
    if cpuset_v1 is not None:
        lines.insert(0, f"3:cpuset:{cpuset_v1}")
    (directory / "cgroup").write_text("\n".join(lines) + "\n")
    if exe:
        os.symlink(exe, directory / "exe")
    for tid, (thread_nice, thread_cpus) in threads.items():
        task = directory / "task" / str(tid)
        task.mkdir()
        (task / "stat").write_text(_stat_line(tid, comm, ppid, flags, thread_nice, len(threads), start))
        (task / "status").write_text(_status(comm, pid, uid, thread_cpus))


def make_proc_root(tmp_path: Path, boot_time: int = 1_700_000_000) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {boot_time}\n")
    return root


def make_sys_root(tmp_path: Path, online: str = "0-1") -> Path:
    root = tmp_path / "sys"
    (root / "devices/system/cpu").mkdir(parents=True)
    (root / "devices/system/cpu/online").write_text(online + "\n")
    return root


def check_host_argv(tmp_path: Path, monkeypatch, proc_root: Path, policies: Path, *options: str) -> list[str]:
    """argv of `policy check --host` on a fake host: /proc at `proc_root`, CPUs 0-3 online, a config
    protecting comm "victim" with the policies at `policies`. Scheduling groups come from the fake
    tree alone (SchedGroups without a cpu controller), not from this machine's cgroup mounts."""
    from remediator.schedgroups import SchedGroups

    monkeypatch.setattr(SchedGroups, "for_host", classmethod(lambda cls, procfs, cgroupfs=None, mountinfo=None: cls(procfs, None)))
    config = tmp_path / "remediator.toml"
    config.write_text(f'[protect]\ncomm = ["victim"]\n[daemon]\npolicies = ["{policies}"]\n')
    return ["policy", "check", "--host", "--proc-root", str(proc_root), "--sysfs-root", str(make_sys_root(tmp_path, "0-3")),
            *options, str(config)]
