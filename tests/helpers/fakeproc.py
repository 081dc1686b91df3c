"""Write a fake procfs tree into a directory: just the files remediator reads, in the kernel's formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeThread:
    tid: int
    run_ns: int = 0
    wait_ns: int = 0
    timeslices: int = 0


@dataclass
class FakeProcess:
    pid: int
    comm: str
    ppid: int = 1
    start_time: int = 1000
    utime: int = 0
    stime: int = 0
    nice: int = 0
    flags: int = 0x400000
    uid: int = 0
    euid: int | None = None  # None: the same as uid
    cmdline: tuple[str, ...] = ()
    cgroup_v2: str = "/"
    cgroup_v1: dict[str, str] = field(default_factory=dict)
    threads: list[FakeThread] = field(default_factory=list)
    autogroup: str | None = None  # /proc/<pid>/autogroup, e.g. "/autogroup-7 nice 0"; None: no such file

    def stat_line(self, tid: int | None = None) -> str:
        # Fields 3.. of /proc/<pid>/stat; the ones remediator reads carry the values, the rest 0.
        fields = ["S", str(self.ppid), "1", "1", "0", "-1", str(self.flags), "0", "0", "0", "0",
                  str(self.utime), str(self.stime), "0", "0", "20", str(self.nice),
                  str(max(1, len(self.threads))), "0", str(self.start_time)] + ["0"] * 32
        return f"{tid or self.pid} ({self.comm}) " + " ".join(fields) + "\n"


class FakeProc:
    """A procfs tree under `root`; call write() after changing processes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.processes: dict[int, FakeProcess] = {}
        self.cpu_ticks: list[list[int]] = [[0] * 10, [0] * 10]
        self.psi_some_total_us = 0
        self.autogroup_enabled: int | None = None  # /proc/sys/kernel/sched_autogroup_enabled; None: absent

    def add(self, process: FakeProcess) -> FakeProcess:
        if not process.threads:
            process.threads = [FakeThread(process.pid)]
        self.processes[process.pid] = process
        return process

    def remove(self, pid: int) -> None:
        self.processes.pop(pid, None)
        import shutil

        shutil.rmtree(self.root / str(pid), ignore_errors=True)

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        total = [sum(column) for column in zip(*self.cpu_ticks)]
        lines = ["cpu  " + " ".join(map(str, total))]
        lines += [f"cpu{index} " + " ".join(map(str, ticks)) for index, ticks in enumerate(self.cpu_ticks)]
        lines += ["intr 0", "ctxt 0", "btime 1700000000", "processes 1"]
        (self.root / "stat").write_text("\n".join(lines) + "\n")
        (self.root / "pressure").mkdir(exist_ok=True)
        (self.root / "pressure/cpu").write_text(
            f"some avg10=0.00 avg60=0.00 avg300=0.00 total={self.psi_some_total_us}\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )
        if self.autogroup_enabled is not None:
            (self.root / "sys/kernel").mkdir(parents=True, exist_ok=True)
            (self.root / "sys/kernel/sched_autogroup_enabled").write_text(f"{self.autogroup_enabled}\n")
        for process in self.processes.values():
            base = self.root / str(process.pid)
            (base / "task").mkdir(parents=True, exist_ok=True)
            (base / "stat").write_text(process.stat_line())
            (base / "comm").write_text(process.comm + "\n")
            (base / "cmdline").write_text("\0".join(process.cmdline) + ("\0" if process.cmdline else ""))
            (base / "status").write_text(
                f"Name:\t{process.comm}\nTgid:\t{process.pid}\nPid:\t{process.pid}\nPPid:\t{process.ppid}\n"
                f"Uid:\t{process.uid}\t{process.uid if process.euid is None else process.euid}\t{process.uid}\t{process.uid}\n"
            )
            cgroup_lines = [f"{index + 1}:{controller}:{path}" for index, (controller, path) in enumerate(process.cgroup_v1.items())]
            cgroup_lines.append(f"0::{process.cgroup_v2}")
            (base / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
            if process.autogroup is not None:
                (base / "autogroup").write_text(process.autogroup + ("\n" if process.autogroup else ""))
            existing = {int(name) for name in (p.name for p in (base / "task").iterdir())}
            for thread in process.threads:
                task = base / "task" / str(thread.tid)
                task.mkdir(exist_ok=True)
                (task / "stat").write_text(process.stat_line(thread.tid))
                (task / "schedstat").write_text(f"{thread.run_ns} {thread.wait_ns} {thread.timeslices}\n")
                (task / "comm").write_text(process.comm + "\n")
            for stale in existing - {thread.tid for thread in process.threads}:
                import shutil

                shutil.rmtree(base / "task" / str(stale), ignore_errors=True)
        return self.root
