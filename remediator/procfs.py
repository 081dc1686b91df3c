"""Reading processes from procfs, with the procfs root as a parameter so tests use fake trees.

psutil lists the processes. Its `PROCFS_PATH` is a module global, so `ProcFS._psutil` points it at
this tree for the length of one call and puts it back, and maps psutil's exceptions to ours: the
one place both happen. Every other read is hand-written, each with the measured reason beside it
(bench/procfs_reads.py, bench/exec_churn.py): a psutil handle reads the stat file again as it is
made, and the daemon reads every new process on a host that execs. The cmdline is split as psutil
splits it (split_cmdline).

A process is identified by (pid, start time): the start time (field 22 of /proc/<pid>/stat, in clock
ticks since boot) tells a reused pid apart. It stays in ticks rather than psutil's create_time()
(float seconds since the epoch, derived from the same field and the boot time) because journals
store ticks and because `stat()` is a hot-path read. Every failure on a process goes through one
translation: a process that vanished is `ProcessGone` (ordinary), a refusal is `AccessDenied` (an error).

`hold(pid)` keeps a directory descriptor of /proc/<pid> while a change is made: the kernel ties it
to that process, not to the number, so reads, thread lists and identity checks through it fail with
ESRCH once the process has gone, even if a new process took the pid in between.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, Protocol, TypeVar

import psutil

from .errors import AccessDenied, ProcessGone, RemediatorError, translate_os_error

log = logging.getLogger(__name__)
T = TypeVar("T")

PF_KTHREAD = 0x00200000  # include/linux/sched.h: "I am a kernel thread"
KTHREADD_PID = 2


@dataclass(frozen=True, order=True)
class ProcessIdentity:
    pid: int
    start_time: int  # clock ticks since boot

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    utime: int  # clock ticks
    stime: int
    nice: int
    num_threads: int
    start_time: int
    processor: int

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD) or self.pid == KTHREADD_PID or self.ppid == KTHREADD_PID


@dataclass(frozen=True)
class ProcessInfo:
    """What policies match on and what the audit shows: plain data, JSON-friendly."""

    pid: int
    start_time: int
    comm: str
    exe: str = ""
    cmdline: tuple[str, ...] = ()
    cgroup: str = ""  # the v2 path, or on v1 hosts the name=systemd path
    unit: str = ""
    uid: int = -1  # real uid
    user: str = ""
    euid: int = -1  # effective uid (-1: not known, as in older recordings)
    ppid: int = 0
    ancestors: tuple[tuple[int, str], ...] = ()  # (pid, comm), parent first, PID 1 excluded
    kernel_thread: bool = False
    sched_group: str = ""  # its CPU scheduling group (schedgroups.py); "" when not read

    @cached_property
    def identity(self) -> ProcessIdentity:  # made once: the engine asks it dozens of times a tick
        return ProcessIdentity(self.pid, self.start_time)

    def __hash__(self) -> int:
        # Kept once made (the fields never change): the policy set's select() and the samples'
        # memos hash each ProcessInfo many times a tick, and the dataclass's own hash walks every
        # field, the cmdline and ancestors included, each time. Equal objects hash equal as before.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = self.__dict__["_hash"] = hash(tuple(getattr(self, name) for name in _PROCESS_INFO_FIELDS))
        return cached

    def to_json(self) -> dict:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "comm": self.comm,
            "exe": self.exe,
            "cmdline": list(self.cmdline),
            "cgroup": self.cgroup,
            "unit": self.unit,
            "uid": self.uid,
            "user": self.user,
            "euid": self.euid,
            "ppid": self.ppid,
            "ancestors": [list(a) for a in self.ancestors],
            "kernel_thread": self.kernel_thread,
            "sched_group": self.sched_group,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ProcessInfo":
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            comm=str(data["comm"]),
            exe=str(data.get("exe", "")),
            cmdline=tuple(data.get("cmdline", ())),
            cgroup=str(data.get("cgroup", "")),
            unit=str(data.get("unit", "")),
            uid=int(data.get("uid", -1)),
            user=str(data.get("user", "")),
            euid=int(data.get("euid", -1)),
            ppid=int(data.get("ppid", 0)),
            ancestors=tuple((int(p), str(c)) for p, c in data.get("ancestors", ())),
            kernel_thread=bool(data.get("kernel_thread", False)),
            sched_group=str(data.get("sched_group", "")),
        )


@dataclass(frozen=True)
class CgroupMembership:
    v2_path: str = ""  # from the "0::" line ("" when the process is not in a v2 hierarchy)
    v1_paths: dict[str, str] = field(default_factory=dict)  # controller (or name=...) -> path

    @property
    def systemd_path(self) -> str:
        """The path systemd placed the process at: v2, or v1's name=systemd hierarchy."""
        return self.v2_path or self.v1_paths.get("name=systemd", "")


# The command line an audit or culprit line shows: enough to tell processes apart. A process's own
# arguments (32 KiB read, invalid UTF-8 six bytes each in JSON) must not make each of its lines huge.
SHOWN_CMDLINE_MAX = 1024


def shown_cmdline(argv) -> str:
    text = " ".join(argv)
    if len(text) <= SHOWN_CMDLINE_MAX:
        return text
    return text[:SHOWN_CMDLINE_MAX] + f"... ({len(text) - SHOWN_CMDLINE_MAX} more characters)"


def bounded_cmdline(data: bytes) -> bytes:
    """The first CMDLINE_MAX_BYTES of a cmdline read as CMDLINE_MAX_BYTES + 1 bytes, still
    NUL-terminated when it was NUL-separated, so split_cmdline splits it as it would the whole."""
    if len(data) <= CMDLINE_MAX_BYTES:
        return data
    data = data[:CMDLINE_MAX_BYTES]
    return data + b"\0" if b"\0" in data else data


def split_cmdline(data: str) -> list[str]:
    """/proc/PID/cmdline's text as arguments, as psutil splits it: on NULs, or on spaces where a
    process rewrote its title (setproctitle: no NUL at the end, or one NUL after a spaced title)."""
    if not data:
        return []
    separator = "\0" if data.endswith("\0") else " "
    if data.endswith(separator):
        data = data[:-1]
    parts = data.split(separator)
    if separator == "\0" and len(parts) == 1 and " " in data:
        parts = data.split(" ")
    return parts


class KnownAncestors(Protocol):
    """What a caller remembers of processes' ancestors (see ProcFS.ancestors)."""

    def above(self, parent: ProcStat) -> tuple[tuple[int, str], ...] | None:
        """The ancestors of the process whose stat was just read, when they are known for that very
        process (its pid, start time and comm), else None."""

    def learn(self, link: ProcStat, above: tuple[tuple[int, str], ...]) -> None:
        """The ancestors of a process whose stat was just read, found by walking up from it."""


_PROCESS_INFO_FIELDS = tuple(item.name for item in fields(ProcessInfo))


def system_units(path: str) -> tuple[str, ...]:
    """The system manager's units a cgroup path lies in: its slices, then its service or scope.

    '/system.slice/nginx.service/worker' -> ('system.slice', 'nginx.service'). Anchored: the unit is
    the first component that is not a slice, and only slices may come before it. Below a unit is
    that unit's own (delegated) subtree, where its processes name cgroups as they like: a user's
    manager (user@1000.service) creates 'nginx.service' under itself, a container manager anything.
    Such names are not the system's units, so a process cannot claim one by where it puts itself.
    """
    units: list[str] = []
    for part in path.split("/"):
        if not part:
            continue
        if part.endswith(".slice"):
            units.append(part)
            continue
        if part.endswith((".service", ".scope")):
            units.append(part)
        break
    return tuple(units)


def unit_from_cgroup_path(path: str) -> str:
    """The system unit (service or scope) of a cgroup path, '' when it is in none.

    '/system.slice/nginx.service' -> 'nginx.service';
    '/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service' -> 'user@1000.service'.
    """
    units = system_units(path)
    return units[-1] if units and not units[-1].endswith(".slice") else ""


USER_NAME_KEPT_S = 60.0  # a user added or renamed is seen within this
_user_names: dict[int, tuple[str, float]] = {}  # uid -> (name, when looked up)


def _user_name(uid: int) -> str:
    """The user's name (the uid as text where it has none), kept USER_NAME_KEPT_S: every new process
    is named by it, and each lookup reads the password database (13 us, bench/exec_churn.py)."""
    now = time.monotonic()
    kept = _user_names.get(uid)
    if kept is not None and now - kept[1] < USER_NAME_KEPT_S:
        return kept[0]
    try:
        name = pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        name = str(uid)
    if len(_user_names) >= 1024:
        _user_names.clear()  # bounded: a host of a thousand users looks them up again
    _user_names[uid] = (name, now)
    return name


IDLE_WORKER_S = 10.0  # a worker with nothing to read for this long ends (a ProcFS made for one look needs none)


READ_CHUNK = 16384  # more than a process's stat, status or cgroup file holds: one read() each
# A process's arguments can be a quarter of its stack limit (unlimited: gigabytes), shared by every
# child it forks: the daemon reads, judges and keeps only this much of them. A JVM's classpath is a
# few KiB; a policy's `cmdline` pattern is matched against these first bytes (docs/policy-format.md).
CMDLINE_MAX_BYTES = 32768
BLOCKED_WARNING_EVERY_S = 60.0  # see ProcFS._warn_blocked


def _read_all(fd: int) -> bytes:
    """The whole file, by os.read: open, read, close. A Python file object adds an fstat and a
    second read() to see the end, and every new process has six files read (bench/exec_churn.py).
    A read shorter than asked is the end (procfs fills what it is asked for from its records;
    regular files, the tests' fake trees, end the same way)."""
    chunk = os.read(fd, READ_CHUNK)
    if len(chunk) < READ_CHUNK:
        return chunk
    chunks = [chunk]
    while chunk:
        chunk = os.read(fd, READ_CHUNK)
        chunks.append(chunk)
    return b"".join(chunks)


class ReadBlocked(OSError):
    """A read that did not finish in time (it goes on in a thread of its own: `abandoned`), or
    that was refused at once because the file, or too many others, still block."""

    def __init__(self, message: str, abandoned: bool = False):
        super().__init__(message)
        self.abandoned = abandoned


class _ReadRequest:
    def __init__(self, path: str, read: Callable[[], object]):
        self.path = path
        self.read = read
        self.done = threading.Event()
        self.data: object = None
        self.error: BaseException | None = None


class _ReadWorker(threading.Thread):
    def __init__(self, owner: "BoundedReads"):
        super().__init__(name="remediator-procread", daemon=True)
        self.owner = owner
        self.requests: queue.SimpleQueue[_ReadRequest] = queue.SimpleQueue()
        self.abandoned = False  # set (under the owner's lock) when a caller stopped waiting for it

    def run(self) -> None:
        while True:
            try:
                request = self.requests.get(timeout=IDLE_WORKER_S)
            except queue.Empty:
                with self.owner.lock:
                    if self.requests.empty():  # nothing was put since: leave (a later read starts a worker)
                        if self.owner._worker is self:
                            self.owner._worker = None
                        return
                continue
            try:
                request.data = request.read()
            except BaseException as exc:  # handed to the caller, whatever it is
                request.error = exc
            with self.owner.lock:
                request.done.set()
                if self.abandoned:
                    self.owner.stuck.pop(request.path, None)  # unblocked at last: readable again
                    return


class BoundedReads:
    """Reads that can block, done on a worker thread and waited for at most `timeout_s`.

    Reading /proc/PID/cmdline takes the target's mmap lock (it reads the process's memory), so it
    blocks for as long as another task holds that lock: a process in D state in a page fault on a
    hung NFS mount, or one whose mm is being torn down. The loop must not stall past the systemd
    watchdog for that, so such reads go to a worker; on timeout the worker is left to finish (a
    thread in an uninterruptible read cannot be cancelled), the file counts as blocked until it
    does, and a fresh worker takes the next read. At most `max_stuck` workers are left blocked;
    past that, reads are refused at once. One worker in the common case: no thread per read.
    """

    def __init__(self, timeout_s: float = 1.0, max_stuck: int = 8):
        self.timeout_s = timeout_s
        self.max_stuck = max_stuck
        self.lock = threading.Lock()
        self.stuck: dict[str, _ReadWorker] = {}  # path -> the worker still blocked reading it
        self.blocked = 0  # reads that timed out or were refused because the file still blocks
        self._worker: _ReadWorker | None = None
        self._pid = os.getpid()

    def call(self, key: str, read: Callable[[], T]) -> T:
        """read() on the worker; ReadBlocked when it takes longer than timeout_s or `key` (the
        file) still blocks an earlier worker."""
        path = key
        with self.lock:
            if self._pid != os.getpid():  # a forked child: the parent's threads are not here
                self._pid, self._worker, self.stuck = os.getpid(), None, {}
            if path in self.stuck or len(self.stuck) >= self.max_stuck:
                self.blocked += 1
                why = "an earlier read of it is still blocked" if path in self.stuck else f"{len(self.stuck)} reads are blocked"
                raise ReadBlocked(f"{path}: not read: {why}")
            worker = self._worker
            if worker is None:
                worker = self._worker = _ReadWorker(self)
                worker.start()
            request = _ReadRequest(path, read)
            worker.requests.put(request)  # under the lock: an idle worker cannot leave with it unread
        if not request.done.wait(self.timeout_s):
            with self.lock:
                if not request.done.is_set():
                    worker.abandoned = True
                    self.stuck[path] = worker
                    if self._worker is worker:
                        self._worker = None
                    self.blocked += 1
                    raise ReadBlocked(f"{path}: blocked for more than {self.timeout_s:g} s", abandoned=True)
        if request.error is not None:
            raise request.error
        return request.data  # type: ignore[return-value]


# psutil.PROCFS_PATH is one global for every ProcFS in the process (tests use several trees).
_PSUTIL_ROOT = threading.RLock()


class ProcFS:
    """Access to one procfs tree (the real /proc by default)."""

    def __init__(self, root: str | Path = "/proc", *, read_timeout_s: float = 1.0):
        self.root = Path(root)
        self._root = str(self.root)  # plain strings: the daemon reads these files every tick
        self._bounded = BoundedReads(read_timeout_s)
        self._blocked_warned_at, self._blocked_warned_count = float("-inf"), 0
        self._held: dict[int, int] = {}  # pid -> directory descriptor of the process held by hold()
        self._last_listing: tuple[float, list[int]] | None = None  # (monotonic time, pids) of the last pids()

    # -- holding a process ------------------------------------------------------------------
    @contextmanager
    def hold(self, pid: int):
        """Pin `pid` to the process it names now, until the block ends.

        Inside the block every read of the pid (stat, status, cgroup, exe, the thread list) goes
        through a directory descriptor of /proc/<pid>, which keeps naming that process: once it
        has gone they raise ProcessGone, even when another process has taken the pid since.
        Nested holds of the same pid share the outer descriptor.
        """
        if pid in self._held:
            yield
            return
        try:
            fd = os.open(f"{self._root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise translate_os_error(exc, pid, f"open {self._root}/{pid}") from None
        self._held[pid] = fd
        try:
            yield
        finally:
            del self._held[pid]
            os.close(fd)

    def owns_thread(self, pid: int, tid: int) -> bool:
        """Is `tid` a thread of the process `pid` names (the held one, inside hold())?"""
        try:
            held = self._held.get(pid)
            if held is not None:
                os.stat(f"task/{tid}", dir_fd=held)
            else:
                os.stat(f"{self._root}/{pid}/task/{tid}")
        except OSError:
            return False
        return True

    @property
    def blocked_reads(self) -> int:
        """Reads of files that block (cmdline) given up on: timed out, or skipped while still blocked."""
        return self._bounded.blocked

    @contextmanager
    def _psutil(self, pid: int | None, what: str) -> Iterator[None]:
        """psutil reading this tree, and its errors as ours. The only place either is done."""
        with _PSUTIL_ROOT:
            saved, psutil.PROCFS_PATH = psutil.PROCFS_PATH, self._root
            try:
                yield
            except psutil.NoSuchProcess:  # ZombieProcess too: it has exited, only its entry is left
                raise ProcessGone(pid if pid is not None else -1) from None
            except psutil.AccessDenied:
                raise AccessDenied(pid, what) from None
            except OSError as exc:
                raise translate_os_error(exc, pid, what) from None
            except psutil.Error as exc:
                raise RemediatorError(f"{what}: {exc}" + (f" (pid {pid})" if pid is not None else "")) from None
            finally:
                psutil.PROCFS_PATH = saved

    # -- raw reads --------------------------------------------------------------------------
    def _read(self, pid: int, name: str, tid: int | None = None) -> str:
        relative = name if tid is None else f"task/{tid}/{name}"
        held = self._held.get(pid)
        path = f"{self._root}/{pid}/{relative}"
        try:
            if held is not None:
                fd = os.open(relative, os.O_RDONLY | os.O_CLOEXEC, dir_fd=held)
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return _read_all(fd).decode(errors="replace")
            finally:
                os.close(fd)
        except OSError as exc:
            raise translate_os_error(exc, pid, f"read {path}") from None

    def pids(self) -> list[int]:
        with self._psutil(None, f"list {self.root}"):
            listed = psutil.pids()
        self._last_listing = (time.monotonic(), listed)
        return listed

    def recent_pids(self, max_age_s: float) -> list[int] | None:
        """The last pids() listing when it is at most `max_age_s` old, else None. Listing /proc
        costs milliseconds on a host of a thousand processes (the kernel makes a dentry per pid);
        the collector lists it at each rescan and the burst watch, in the same tick, reuses that."""
        if self._last_listing is None or time.monotonic() - self._last_listing[0] > max_age_s:
            return None
        return list(self._last_listing[1])

    def tids(self, pid: int) -> list[int]:
        # Hand-written, per tick for every protected process: psutil's threads() also reads each
        # thread's stat file, 134.8 us a process against 11.5 us (12x, bench/procfs_reads.py).
        held = self._held.get(pid)
        try:
            if held is None:
                names = os.listdir(f"{self._root}/{pid}/task")
            else:
                task = os.open("task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=held)
                try:
                    names = os.listdir(task)
                finally:
                    os.close(task)
        except OSError as exc:
            raise translate_os_error(exc, pid, f"list {self.root}/{pid}/task") from None
        return [int(name) for name in names if name.isdigit()]

    def stat(self, pid: int, tid: int | None = None) -> ProcStat:
        # Hand-written: read per tick for every process (CPU time, identity re-checks); psutil's
        # Process(pid) + name() costs 129.0 us against 24.9 us (5x, bench/procfs_reads.py), has no
        # flags field (kernel threads) and gives the start time as epoch seconds, not the journal's ticks.
        text = self._read(pid, "stat", tid)
        # comm sits in parentheses and may itself contain spaces and parentheses.
        open_paren, close_paren = text.find("("), text.rfind(")")
        if open_paren < 0 or close_paren < 0:
            raise RemediatorError(f"{self.root}/{pid}/stat: unparsable: {text[:80]!r}")
        comm = text[open_paren + 1 : close_paren]
        rest = text[close_paren + 2 :].split()
        # rest[0] is field 3 (state); field N is rest[N - 3].
        return ProcStat(
            pid=tid if tid is not None else pid,
            comm=comm,
            state=rest[0],
            ppid=int(rest[1]),
            flags=int(rest[6]),
            utime=int(rest[11]),
            stime=int(rest[12]),
            nice=int(rest[16]),
            num_threads=int(rest[17]),
            start_time=int(rest[19]),
            processor=int(rest[36]) if len(rest) > 36 else -1,
        )

    def thread_count(self, pid: int) -> int:
        """How many threads a process has. procfs gives a task directory one link per thread
        beyond its own two, so this is one stat() whatever the thread count; /proc/PID/stat's
        num_threads comes with the CPU times of every thread summed, which on a 500-thread
        service costs ten times more. A tree without that count (fewer than three links: no
        thread) falls back to num_threads."""
        try:
            links = os.stat(f"{self._root}/{pid}/task").st_nlink
        except FileNotFoundError:
            links = 0
        except OSError as exc:
            raise translate_os_error(exc, pid, f"stat {self._root}/{pid}/task") from None
        return links - 2 if links > 2 else self.stat(pid).num_threads

    def identity(self, pid: int) -> ProcessIdentity:
        return ProcessIdentity(pid, self.stat(pid).start_time)

    def verify(self, identity: ProcessIdentity) -> ProcStat:
        """Re-read the process and make sure the pid still names the same process."""
        current = self.stat(identity.pid)
        if current.start_time != identity.start_time:
            raise ProcessGone(identity.pid, f"pid reused (started at {current.start_time}, expected {identity.start_time})")
        return current

    def comm(self, pid: int) -> str:
        return self._read(pid, "comm").rstrip("\n")

    def cmdline(self, pid: int) -> tuple[str, ...]:
        """The arguments; a title rewritten with spaces (setproctitle) is split on them, as psutil does.
        Read on BoundedReads' worker; () when the read blocks: a policy matching on cmdline then
        does not match, so a process that cannot be read is never acted on for it. Inside hold()
        the worker opens it through its own copy of the held directory's descriptor (the block
        may end, and close the original, while a blocked read goes on)."""
        held = self._held.get(pid)
        if held is None:
            path = f"{self._root}/{pid}/cmdline"

            def read() -> bytes:
                with open(path, "rb") as handle:
                    return handle.read(CMDLINE_MAX_BYTES + 1)
        else:
            directory = os.dup(held)

            def read() -> bytes:
                try:
                    with open(os.open("cmdline", os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory), "rb") as handle:
                        return handle.read(CMDLINE_MAX_BYTES + 1)
                finally:
                    os.close(directory)

        try:
            data = bounded_cmdline(self._bounded_read(pid, "cmdline", read)).decode(errors="replace")
        except ReadBlocked as exc:
            if held is not None and not exc.abandoned:
                os.close(directory)  # refused before the worker had it; an abandoned read closes its own
            return ()
        return tuple(part for part in split_cmdline(data) if part)

    def _bounded_read(self, pid: int, name: str, read: Callable[[], T]) -> T:
        """read() on the worker, its errors as ours."""
        path = f"{self._root}/{pid}/{name}"
        try:
            return self._bounded.call(path, read)
        except ReadBlocked as exc:
            if "earlier read" not in str(exc):
                self._warn_blocked(f"{exc}: its {name} is taken as unknown")
            raise
        except OSError as exc:
            raise translate_os_error(exc, pid, f"read {path}") from None

    def _warn_blocked(self, text: str) -> None:
        """At most one warning a minute: with reads stuck, every process execed is refused one, and
        a line each would push the daemon's other messages past journald's rate limit."""
        now = time.monotonic()
        if now - self._blocked_warned_at >= BLOCKED_WARNING_EVERY_S:
            since = self.blocked_reads - self._blocked_warned_count
            more = f" ({since - 1} more since the last such warning)" if self._blocked_warned_at > float("-inf") and since > 1 else ""
            log.warning("%s%s", text, more)
            self._blocked_warned_at, self._blocked_warned_count = now, self.blocked_reads

    def exe(self, pid: int) -> str:
        """The executable path, or "" where the kernel will not say (kernel threads, EACCES, zombies).
        A readlink: the kernel answers it from the task without the mmap lock, so it cannot block
        as a cmdline read can."""
        held = self._held.get(pid)
        try:
            # Held during a change: through the descriptor, so a reused pid cannot answer for it.
            target = os.readlink("exe", dir_fd=held) if held is not None else os.readlink(f"{self._root}/{pid}/exe")
        except OSError as exc:
            if exc.errno == errno.ESRCH or (held is None and exc.errno == errno.ENOENT and not os.path.lexists(f"{self._root}/{pid}")):
                raise ProcessGone(pid) from None
            return ""
        return target.removesuffix(" (deleted)")

    def status(self, pid: int) -> dict[str, str]:
        fields = {}
        for line in self._read(pid, "status").splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return fields

    def tgid_of(self, tid: int) -> int:
        """The process a thread belongs to (/proc/<tid> resolves for any thread id)."""
        return int(self.status(tid).get("Tgid", tid))

    def uid(self, pid: int) -> int:
        """The real uid."""
        return self.uids(pid)[0]

    def uids(self, pid: int) -> tuple[int, int]:
        """(real, effective) uid, from the Uid: line of /proc/<pid>/status (that line alone is
        parsed: the file has some fifty, and every new process is read)."""
        text = "\n" + self._read(pid, "status")  # every line, the first too, starts after a newline
        start = text.find("\nUid:")
        if start < 0:
            raise RemediatorError(f"{self.root}/{pid}/status: no Uid line")
        end = text.find("\n", start + 1)
        fields = text[start + 5 : end if end >= 0 else None].split()
        return int(fields[0]), int(fields[1])

    def cgroups(self, pid: int) -> CgroupMembership:
        v2_path = ""
        v1_paths: dict[str, str] = {}
        for line in self._read(pid, "cgroup").splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                v2_path = path
            else:
                for controller in controllers.split(","):
                    if controller:
                        v1_paths[controller] = path
        return CgroupMembership(v2_path, v1_paths)

    def autogroup(self, pid: int) -> str:
        """/proc/<pid>/autogroup: '/autogroup-N nice M', or '' in the root's own autogroup or on a
        kernel without autogroups."""
        try:
            return self._read(pid, "autogroup")
        except ProcessGone:  # ENOENT: the process, or only the file (no CONFIG_SCHED_AUTOGROUP)
            if pid in self._held or not (self.root / str(pid)).exists():
                raise
            return ""

    def schedstat(self, pid: int, tid: int | None = None) -> tuple[int, int, int]:
        """(on-CPU ns, run-queue wait ns, timeslices) for one task, cumulative."""
        run_ns, wait_ns, slices = self._read(pid, "schedstat", tid).split()[:3]
        return int(run_ns), int(wait_ns), int(slices)

    # -- composed views -----------------------------------------------------------------------
    def _parents(self, ppid: int, limit: int, child_pid: int = 0, child_start: int | None = None) -> Iterator[ProcStat]:
        """The stat of `ppid` and of each parent above it as /proc has them now, PID 1 excluded, at
        most `limit`: one stat read per process. Stops at a parent gone and at one that started
        after its child: that one only took a dead parent's pid (the first link is checked only
        when `child_start` is given)."""
        seen = {child_pid}
        for _ in range(limit):
            if ppid <= 1 or ppid in seen:
                return
            try:
                stat = self.stat(ppid)
            except RemediatorError:
                return
            if child_start is not None and stat.start_time > child_start:
                return
            seen.add(ppid)
            yield stat
            ppid, child_start = stat.ppid, stat.start_time

    def ancestors(self, ppid: int, limit: int = 32, known: KnownAncestors | None = None) -> tuple[tuple[int, str], ...]:
        """(pid, comm) from `ppid` up, PID 1 excluded, stopping at a parent started after its child (a
        reused pid). The comm is the kernel's: policies match comm (psutil's name() would swap a
        15-character comm for the cmdline's basename). `known.above(stat)`: the ancestors of a
        link just read, when the caller remembers them for that very process (its pid, start time
        and comm), so the chain above it is not read again; `known.learn` is told the chain above
        each link read. A shell or supervisor that execs many children then costs one stat per
        child, not one per link (bench/exec_churn.py: 0.1 ms a process under a six-deep chain)."""
        found: list[tuple[int, str]] = []
        links: list[ProcStat] = []
        for stat in self._parents(ppid, limit):
            found.append((stat.pid, stat.comm))
            above = known.above(stat) if known is not None else None
            if above is not None:
                found.extend(above[: limit - len(found)])
                break
            links.append(stat)
        if known is not None and len(found) < limit:  # a chain cut at the limit is not a link's whole chain
            for index, link in enumerate(links):
                known.learn(link, tuple(found[index + 1:]))
        return tuple(found)

    def parent_chain(self, info: ProcessInfo, limit: int = 64) -> dict[int, ProcessInfo]:
        """pid -> `info` and its parents as their stat files say now (pid, start time, comm, ppid):
        what trees.chain needs to follow the chain by start time where no sample holds it (the
        executor's last check). Stops below PID 1, at a parent gone, and at one that started after
        its child: that one only took a dead parent's pid, and its own parents are nobody's."""
        found = {info.pid: info}
        for stat in self._parents(info.ppid, limit, info.pid, info.start_time):
            found[stat.pid] = ProcessInfo(**self._stat_fields(stat))
        return found

    def process_info(self, pid: int, known_ancestors: KnownAncestors | None = None) -> ProcessInfo:
        return self.process_info_and_cgroups(pid, known_ancestors)[0]

    def process_info_and_cgroups(self, pid: int, known_ancestors: KnownAncestors | None = None
                                 ) -> tuple[ProcessInfo, CgroupMembership | None]:
        """process_info, and the cgroup membership it was read with (None: unreadable), so the
        caller that also wants the process's scheduling group reads the file once. Every file is
        read through one descriptor of the process's directory (hold()), so all of them are of
        the process whose stat came first, or ProcessGone: no second stat to catch a reused pid."""
        with self.hold(pid):
            return self._read_held(pid, known_ancestors, complete=True)

    def sketch(self, pid: int, known_ancestors: KnownAncestors | None = None) -> ProcessInfo:
        """Who a process is as far as its stat, exe, cmdline and ancestors say: all that policies
        matching on comm, exe, cmdline and ancestors need to judge it, without its cgroup and
        status files (two of the six files read for every new process, bench/exec_churn.py). Its
        cgroup, unit, uid, user and euid are left unread ("" and -1): a sketch decides whether a
        policy could govern the process, nothing else (see Collector.sketch)."""
        with self.hold(pid):
            return self._read_held(pid, known_ancestors, complete=False)[0]

    def selector_reading(self, pid: int, cgroups: bool, users: bool) -> tuple[ProcessInfo, CgroupMembership | None]:
        """What [protect] selectors judge a process by, and no more: its stat (comm, start time,
        kernel thread), with `cgroups` its cgroup membership (path, unit and the v1 paths), with
        `users` its uids; exe, cmdline and ancestors are left unread. A rescan judges every
        protected process again, and a pre-forking service protected as 50 processes read 50 whole
        process readings (stat, exe, cmdline, cgroup, status, a stat per ancestor) every 5 s:
        ~38 ms (bench/scale.py --service-processes 50)."""
        with self.hold(pid):
            seen = self._stat_fields(self.stat(pid))
            membership = None
            if cgroups:
                membership = self._membership_fields(pid, seen)
            if users:
                self._user_fields(pid, seen)
            return ProcessInfo(**seen), membership

    @staticmethod
    def _stat_fields(stat: ProcStat) -> dict:
        """A ProcessInfo's fields from the process's stat."""
        return dict(pid=stat.pid, start_time=stat.start_time, comm=stat.comm, ppid=stat.ppid,
                    kernel_thread=stat.is_kernel_thread)

    def _membership_fields(self, pid: int, seen: dict) -> CgroupMembership | None:
        """Add the held process's cgroup and unit to `seen`; its membership (None: unreadable)."""
        membership = None
        try:
            membership = self.cgroups(pid)
        except ProcessGone:
            raise
        except RemediatorError:
            pass
        path = membership.systemd_path if membership is not None else ""
        seen.update(cgroup=path, unit=unit_from_cgroup_path(path))
        return membership

    def _user_fields(self, pid: int, seen: dict) -> None:
        """Add the held process's uids and user to `seen`."""
        uid, euid = self.uids(pid)
        seen.update(uid=uid, user=_user_name(uid), euid=euid)

    def _read_held(self, pid: int, known_ancestors: KnownAncestors | None, complete: bool
                   ) -> tuple[ProcessInfo, CgroupMembership | None]:
        """The held process: its stat, exe and cmdline (a kernel thread has neither) and ancestors,
        and when `complete` its cgroup membership and uids too. Read without a psutil handle:
        making one reads the stat file again, a third of this cost for each new process on a
        host that execs (bench/exec_churn.py)."""
        stat = self.stat(pid)
        seen = self._stat_fields(stat)
        exe, cmdline = ("", ()) if stat.is_kernel_thread else (self.exe(pid), self.cmdline(pid))
        seen.update(exe=exe, cmdline=cmdline, ancestors=self.ancestors(stat.ppid, known=known_ancestors))
        if not complete:
            return ProcessInfo(**seen), None
        membership = self._membership_fields(pid, seen)
        self._user_fields(pid, seen)
        return ProcessInfo(**seen), membership

    def iter_processes(self) -> Iterator[ProcessInfo]:
        """Every process that is still there by the time it is read; vanished ones are skipped."""
        for pid in self.pids():
            try:
                yield self.process_info(pid)
            except ProcessGone:
                continue


@dataclass(frozen=True)
class Boot:
    """This boot: its id, and when it began (wall-clock seconds; 0 when unknown)."""

    boot_id: str
    started_at: float


def current_boot(proc_root: str | Path = "/proc") -> Boot:
    """The kernel's random boot id (new at every boot) and the boot time from /proc/stat."""
    try:
        boot_id = Path(proc_root, "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    try:
        started_at = boot_time(proc_root)
    except OSError:
        started_at = 0.0
    return Boot(boot_id, started_at)


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def boot_time(proc_root: str | Path = "/proc") -> float:
    """Wall-clock seconds at boot, to turn start times into readable timestamps."""
    match = re.search(r"^btime (\d+)$", Path(proc_root, "stat").read_text(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0
