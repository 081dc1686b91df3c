"""A fake cgroup v2 tree and a fake procfs tree in tmp_path, with the kernel rules the cpuset actuator meets.

Rules modelled (from Documentation/admin-guide/cgroup-v2.rst):
- a controller can be enabled in cgroup.subtree_control only if cgroup.controllers lists it (ENOENT),
  and not in a non-root cgroup that holds processes (no-internal-process rule: EBUSY); "-CONTROLLER"
  fails with EBUSY while a child still enables it for its own children, and takes its files away;
- a child's cgroup.controllers is its parent's cgroup.subtree_control; cpuset files appear in a child
  when the parent enables cpuset;
- a process moves by writing its pid to cgroup.procs (ESRCH when there is no such process; EBUSY
  when the target has controllers enabled for children); /proc/<pid>/cgroup follows;
- cpuset.cpus must lie within the parent's effective CPUs (EINVAL);
- cpu.weight, cpu.idle and cpu.max appear in a child when the parent enables cpu (defaults 100, 0,
  "max 100000"); a weight outside 1..10000, or on an idle group, is EINVAL, as is a malformed cpu.max;
- rmdir fails with EBUSY while the cgroup holds processes or children.
Faults can be injected per (operation, file name).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from remediator.cgroupfs import CgroupFS, CgroupMount
from remediator.cpulist import format_cpulist, parse_cpulist

CONTROL_FILES = ("cgroup.procs", "cgroup.controllers", "cgroup.subtree_control")
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems", "cpuset.cpus.effective", "cpuset.mems.effective")
CPU_FILES = {"cpu.weight": "100", "cpu.idle": "0", "cpu.max": "max 100000"}


def _error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class FakeProcTree:
    """/proc/<pid>/{stat,status,cgroup,task/<tid>} for processes that exist only on paper."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # psutil reads the boot time from here before anything else (as tests/helpers/fakeproc.py writes it).
        (root / "stat").write_text("cpu  1 2 3 4\nbtime 1700000000\n")

    def add_process(self, pid: int, start_time: int, *, comm: str = "fluent-bit", cgroup: str = "/", tids=(),
                    uid: int = 0) -> None:
        directory = self.root / str(pid)
        (directory / "task").mkdir(parents=True)
        for tid in (pid, *tids):
            (directory / "task" / str(tid)).mkdir()
        fields = ["0"] * 50
        fields[0] = "S"  # state
        fields[1] = "1"  # ppid: init, so no remediator ancestry
        fields[17] = str(1 + len(tids))  # num_threads
        fields[19] = str(start_time)
        (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
        (directory / "status").write_text(f"Name:\t{comm}\nTgid:\t{pid}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (directory / "cmdline").write_text(f"{comm}\0")
        self.set_cgroup(pid, cgroup)

    def set_cgroup(self, pid: int, path: str) -> None:
        (self.root / str(pid) / "cgroup").write_text(f"0::{path}\n")

    def cgroup(self, pid: int) -> str:
        return (self.root / str(pid) / "cgroup").read_text().strip().split("::", 1)[1]


class FakeCgroupV2(CgroupFS):
    def __init__(self, root: Path, procs: FakeProcTree, *, cpus: str = "0-3", mems: str = "0",
                 controllers: str = "cpuset cpu io memory pids"):
        self.root = root
        self.procs = procs
        self.calls: list[tuple[str, str, str]] = []  # (operation, path, value)
        self.faults: dict[tuple[str, str], int] = {}
        root.mkdir(parents=True)
        for name, value in (
            ("cgroup.procs", ""),
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cpuset.cpus.effective", cpus),
            ("cpuset.mems.effective", mems),
        ):
            (root / name).write_text(value + ("\n" if value else ""))

    @property
    def mount(self) -> CgroupMount:
        return CgroupMount(2, self.root, "/", frozenset((self.root / "cgroup.controllers").read_text().split()))

    # -- test controls ------------------------------------------------------------------------
    def fail(self, operation: str, name: str, code: int) -> None:
        """Make `operation` ("read", "write", "mkdir", "rmdir") on a file/dir called `name` fail with `code`."""
        self.faults[(operation, name)] = code

    def path_of(self, cgroup: str) -> Path:
        return self.root / cgroup.strip("/") if cgroup.strip("/") else self.root

    def make_cgroup(self, cgroup: str, pids=()) -> Path:
        """Set up a cgroup the way the host had it before remediator (no calls recorded)."""
        directory = self.path_of(cgroup)
        self._create(directory)
        for pid in pids:
            self._move(directory, pid)
        return directory

    def place(self, cgroup: str, pid: int) -> None:
        """Put a process in an existing cgroup, as the host had it (no calls recorded, no rules checked)."""
        self._move(self.path_of(cgroup), pid)

    def pids_in(self, cgroup: str) -> list[int]:
        return [int(p) for p in (self.path_of(cgroup) / "cgroup.procs").read_text().split()]

    def changes(self) -> list[tuple[str, str, str]]:
        return list(self.calls)

    # -- kernel-like behaviour ----------------------------------------------------------------
    def _check_fault(self, operation: str, path: Path) -> None:
        code = self.faults.get((operation, path.name))
        if code is not None:
            raise _error(code, path)

    def _relative(self, directory: Path) -> str:
        relative = directory.relative_to(self.root).as_posix()
        return "/" if relative == "." else "/" + relative

    def _create(self, directory: Path) -> None:
        parent = directory.parent
        os.mkdir(directory)
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        (directory / "cgroup.procs").write_text("")
        (directory / "cgroup.subtree_control").write_text("")
        (directory / "cgroup.controllers").write_text(" ".join(enabled) + "\n" if enabled else "")
        if "cpuset" in enabled:
            self._add_cpuset_files(directory)
        if "cpu" in enabled:
            self._add_cpu_files(directory)

    def _add_cpu_files(self, directory: Path) -> None:
        for name, value in CPU_FILES.items():
            (directory / name).write_text(value + "\n")

    def _add_cpuset_files(self, directory: Path) -> None:
        parent = directory.parent
        (directory / "cpuset.cpus").write_text("")
        (directory / "cpuset.mems").write_text("")
        (directory / "cpuset.cpus.effective").write_text((parent / "cpuset.cpus.effective").read_text())
        (directory / "cpuset.mems.effective").write_text((parent / "cpuset.mems.effective").read_text())

    def _move(self, directory: Path, pid: int) -> None:
        for procs in self.root.rglob("cgroup.procs"):
            pids = [line for line in procs.read_text().split() if line != str(pid)]
            procs.write_text("".join(f"{p}\n" for p in pids))
        with open(directory / "cgroup.procs", "a") as handle:
            handle.write(f"{pid}\n")
        if (self.procs.root / str(pid)).exists():
            self.procs.set_cgroup(pid, self._relative(directory))

    def read(self, path: Path) -> str:
        self._check_fault("read", Path(path))
        return Path(path).read_text()

    def write(self, path: Path, value: str) -> None:
        path = Path(path)
        self.calls.append(("write", str(path), value))
        self._check_fault("write", path)
        if not path.exists():
            raise _error(errno.ENOENT, path)
        directory, name = path.parent, path.name
        if name == "cgroup.subtree_control":
            for token in value.split():
                sign, controller = token[0], token[1:]
                if controller not in (directory / "cgroup.controllers").read_text().split():
                    raise _error(errno.ENOENT, path)
                enabled = path.read_text().split()
                if sign == "+" and controller not in enabled:
                    if directory != self.root and (directory / "cgroup.procs").read_text().split():
                        raise _error(errno.EBUSY, path)  # no-internal-process rule
                    enabled.append(controller)
                    for child in directory.iterdir():
                        if child.is_dir():
                            (child / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
                            if controller == "cpuset":
                                self._add_cpuset_files(child)
                            if controller == "cpu":
                                self._add_cpu_files(child)
                elif sign == "-" and controller in enabled:
                    children = [child for child in directory.iterdir() if child.is_dir()]
                    if any(controller in (child / "cgroup.subtree_control").read_text().split() for child in children):
                        raise _error(errno.EBUSY, path)  # a child still hands it down
                    enabled.remove(controller)
                    for child in children:
                        (child / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
                        for file in child.glob(controller + ".*"):
                            file.unlink()
                path.write_text(" ".join(enabled) + "\n" if enabled else "")
            return
        if name == "cgroup.procs":
            pid = int(value)
            if not (self.procs.root / str(pid)).exists():
                raise _error(errno.ESRCH, path)
            if directory != self.root and (directory / "cgroup.subtree_control").read_text().split():
                raise _error(errno.EBUSY, path)
            self._move(directory, pid)
            return
        if name == "cpuset.cpus":
            wanted = parse_cpulist(value)
            allowed = parse_cpulist((directory.parent / "cpuset.cpus.effective").read_text())
            if not wanted <= allowed:
                raise _error(errno.EINVAL, path)
            path.write_text(format_cpulist(wanted) + "\n")
            (directory / "cpuset.cpus.effective").write_text(format_cpulist(wanted or allowed) + "\n")
            return
        if name == "cpu.weight":
            if not value.strip().isdigit() or not 1 <= int(value) <= 10000 or (directory / "cpu.idle").read_text().strip() == "1":
                raise _error(errno.EINVAL, path)
            path.write_text(value.strip() + "\n")
            return
        if name == "cpu.idle":
            if value.strip() not in ("0", "1"):
                raise _error(errno.EINVAL, path)
            path.write_text(value.strip() + "\n")
            return
        if name == "cpu.max":
            fields = value.split()
            if len(fields) != 2 or not (fields[0] == "max" or fields[0].isdigit()) or not fields[1].isdigit():
                raise _error(errno.EINVAL, path)
            path.write_text(" ".join(fields) + "\n")
            return
        if name == "cpuset.mems":
            path.write_text(value.strip() + "\n")
            (directory / "cpuset.mems.effective").write_text(value.strip() + "\n")
            return
        path.write_text(value)

    def mkdir(self, path: Path) -> None:
        path = Path(path)
        self.calls.append(("mkdir", str(path), ""))
        self._check_fault("mkdir", path)
        if path.exists():
            raise _error(errno.EEXIST, path)
        self._create(path)

    def rmdir(self, path: Path) -> None:
        path = Path(path)
        self.calls.append(("rmdir", str(path), ""))
        self._check_fault("rmdir", path)
        if (path / "cgroup.procs").read_text().split() or any(child.is_dir() for child in path.iterdir()):
            raise _error(errno.EBUSY, path)
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)
