"""Cgroup mounts (v1 and v2) and one thin object through which every cgroupfs read and write goes.

The mount points are discovered from /proc/self/mountinfo, never assumed: a v1 host mounts the
cpuset hierarchy at /sys/fs/cgroup/cpuset, a hybrid host adds a v2 tree at /sys/fs/cgroup/unified,
a v2-only host has one tree at /sys/fs/cgroup. A controller sits on one hierarchy at a time, so the
cpuset hierarchy is the v1 one when it exists, else the v2 tree whose cgroup.controllers lists it.

`CgroupFS` is deliberately small (read, write, mkdir, rmdir, exists, listdir) so tests replace it
with a fake tree in tmp_path and inject faults such as EBUSY (Supervisor's DummyOptions idea).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .cpulist import CpuListError, online_cpus, parse_cpulist
from .procfs import CgroupMembership

DEFAULT_MOUNTINFO = "/proc/self/mountinfo"

# The same knob has different file names in the two versions.
V1_EFFECTIVE_CPUS = "cpuset.effective_cpus"
V2_EFFECTIVE_CPUS = "cpuset.cpus.effective"
V1_EFFECTIVE_MEMS = "cpuset.effective_mems"
V2_EFFECTIVE_MEMS = "cpuset.mems.effective"


class CgroupFS:
    """Reads and writes cgroupfs files. Every change remediator makes to a cgroup goes through here."""

    def read(self, path: Path) -> str:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()

    def write(self, path: Path, value: str) -> None:
        # One write(2) on an existing file: cgroupfs parses each write as a whole and reports the
        # error from that call. Buffered file objects can defer the error to close(), where it is
        # easy to lose, so plain os.write it is.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            data = value.encode()
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)", str(path))
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy."""

    version: int  # 1 or 2
    mount_point: Path
    root: str  # the path inside the hierarchy that is mounted there ("/" unless a subtree is bind-mounted)
    controllers: frozenset[str]  # v1: from the mount options; v2: from the root's cgroup.controllers

    @property
    def effective_cpus_file(self) -> str:
        return V1_EFFECTIVE_CPUS if self.version == 1 else V2_EFFECTIVE_CPUS

    @property
    def effective_mems_file(self) -> str:
        return V1_EFFECTIVE_MEMS if self.version == 1 else V2_EFFECTIVE_MEMS

    def fs_path(self, cgroup_path: str) -> Path | None:
        """Where a path from /proc/<pid>/cgroup lives in this mount, or None when outside it."""
        cgroup_path = "/" + cgroup_path.strip("/")
        if ".." in cgroup_path.split("/"):
            return None  # a path read from a file must not climb out of the mount
        root = "/" + self.root.strip("/")
        if root != "/":
            if cgroup_path != root and not cgroup_path.startswith(root + "/"):
                return None
            cgroup_path = cgroup_path[len(root) :] or "/"
        relative = cgroup_path.strip("/")
        return self.mount_point / relative if relative else self.mount_point

    def cgroup_path(self, fs_path: Path) -> str:
        """The inverse of fs_path: '/sys/fs/cgroup/cpuset/a/b' -> '/a/b'."""
        relative = Path(fs_path).relative_to(self.mount_point).as_posix()
        inner = "" if relative == "." else relative
        root = self.root.rstrip("/")
        return f"{root}/{inner}".rstrip("/") or "/"

    def to_json(self) -> dict:
        return {"version": self.version, "mount": str(self.mount_point), "root": self.root}


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, index = [], 0
    while index < len(field):
        octal = field[index + 1 : index + 4]
        if field[index] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """Cgroup mounts in a mountinfo text; v2 controllers are left empty (they need a file read)."""
    mounts: list[CgroupMount] = []
    seen: set[tuple[int, str]] = set()
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if separator < 6 or len(fields) < separator + 4:
            continue
        fstype = fields[separator + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        root = _unescape_mountinfo(fields[3])
        mount_point = Path(_unescape_mountinfo(fields[4]))
        if fstype == "cgroup2":
            version, controllers = 2, frozenset()
        else:
            options = fields[separator + 3].split(",")
            known = {"rw", "ro", "clone_children", "noprefix", "xattr", "cpuset_v2_mode", "favordynmods", "nsdelegate"}
            version = 1
            controllers = frozenset(
                option for option in options if option not in known and not option.startswith("release_agent=")
            )
        # The same hierarchy may be bind-mounted several times; the first mount is the one we use.
        key = (version, ",".join(sorted(controllers)) if version == 1 else str(mount_point))
        if key in seen:
            continue
        seen.add(key)
        mounts.append(CgroupMount(version, mount_point, root, controllers))
    return mounts


def discover_mounts(mountinfo_path: str | Path = DEFAULT_MOUNTINFO, cgroupfs: CgroupFS | None = None) -> list[CgroupMount]:
    """The cgroup hierarchies mounted here, v2 ones with their available controllers."""
    cgroupfs = cgroupfs or CgroupFS()
    mounts = []
    for mount in parse_mountinfo(Path(mountinfo_path).read_text()):
        if mount.version == 2:
            try:
                controllers = frozenset(cgroupfs.read(mount.mount_point / "cgroup.controllers").split())
            except OSError:
                controllers = frozenset()
            mount = CgroupMount(2, mount.mount_point, mount.root, controllers)
        mounts.append(mount)
    return mounts


def find_cpuset_mount(mounts: list[CgroupMount]) -> CgroupMount | None:
    """The hierarchy that carries the cpuset controller (v1 first: while bound there, v2 lacks it)."""
    for mount in mounts:
        if mount.version == 1 and "cpuset" in mount.controllers:
            return mount
    for mount in mounts:
        if mount.version == 2 and "cpuset" in mount.controllers:
            return mount
    return None


def find_cpu_mount(mounts: list[CgroupMount]) -> CgroupMount | None:
    """The hierarchy that carries the cpu controller (v1 first, as for cpuset)."""
    for version in (1, 2):
        for mount in mounts:
            if mount.version == version and "cpu" in mount.controllers:
                return mount
    return None


def discover_cpu_mount(mountinfo_path: str | Path = DEFAULT_MOUNTINFO, cgroupfs: CgroupFS | None = None) -> CgroupMount | None:
    try:
        return find_cpu_mount(discover_mounts(mountinfo_path, cgroupfs))
    except OSError:
        return None


def discover_cpuset_mount(mountinfo_path: str | Path = DEFAULT_MOUNTINFO, cgroupfs: CgroupFS | None = None) -> CgroupMount | None:
    try:
        return find_cpuset_mount(discover_mounts(mountinfo_path, cgroupfs))
    except OSError:
        return None


def process_cgroup_path(mount: CgroupMount, membership: CgroupMembership) -> str | None:
    """The process's path in `mount`'s hierarchy (from /proc/<pid>/cgroup), or None."""
    if mount.version == 2:
        return membership.v2_path or None
    for controller in mount.controllers:
        if controller in membership.v1_paths:
            return membership.v1_paths[controller]
    return None


def subtree_pids(cgroupfs: CgroupFS, directory: Path) -> list[int]:
    """Every process in a cgroup and below it (a unit may delegate a subtree); [] where unreadable."""
    pids: list[int] = []
    try:
        pids += cgroup_pids(cgroupfs, directory)
        children = [name for name in cgroupfs.listdir(directory) if cgroupfs.exists(directory / name / "cgroup.procs")]
    except OSError:
        return pids
    for child in children:
        pids += subtree_pids(cgroupfs, directory / child)
    return pids


def cgroup_pids(cgroupfs: CgroupFS, directory: Path) -> list[int]:
    """Processes in one cgroup (its own, not its descendants')."""
    return [int(line) for line in cgroupfs.read(directory / "cgroup.procs").split() if line.strip().isdigit()]


def effective_cpus(cgroupfs: CgroupFS, mount: CgroupMount, cgroup_path: str) -> tuple[frozenset[int], str] | None:
    """CPUs a cgroup's tasks may run on, and the cgroup that says so.

    In v2 a cgroup without the cpuset controller enabled has no cpuset files and simply inherits,
    so the nearest ancestor that has the file answers.
    """
    path = "/" + cgroup_path.strip("/")
    while True:
        directory = mount.fs_path(path)
        if directory is not None:
            try:
                return parse_cpulist(cgroupfs.read(directory / mount.effective_cpus_file)), path
            except (OSError, CpuListError):
                pass
        if path == "/":
            return None
        path = path.rsplit("/", 1)[0] or "/"


def process_cpuset_cpus(cgroupfs: CgroupFS, mount: CgroupMount | None, membership: CgroupMembership) -> frozenset[int] | None:
    """The CPUs the process's cpuset cgroup allows (v2 cpuset.cpus.effective, v1 cpuset.effective_cpus,
    of its cgroup or the nearest ancestor that has the file), or None where no cpuset hierarchy says."""
    if mount is None:
        return None
    cgroup_path = process_cgroup_path(mount, membership)
    if cgroup_path is None:
        return None
    found = effective_cpus(cgroupfs, mount, cgroup_path)
    return found[0] if found is not None else None


def allowed_cpus(
    cgroupfs: CgroupFS,
    mount: CgroupMount | None,
    membership: CgroupMembership,
    sysfs_root: str | Path = "/sys",
) -> tuple[frozenset[int], str]:
    """CPUs a process may be given by sched_setaffinity, and where that answer comes from."""
    if mount is not None:
        cgroup_path = process_cgroup_path(mount, membership)
        if cgroup_path is not None:
            found = effective_cpus(cgroupfs, mount, cgroup_path)
            if found is not None:
                cpus, source = found
                return cpus, f"cpuset {source}"
    return online_cpus(sysfs_root), "online CPUs"
