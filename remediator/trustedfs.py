"""Open the files a root daemon acts on (config, policies, journal, audit log) so no local user can steer it.

A path is walked from `/` one component at a time, each opened with O_NOFOLLOW relative to the
directory before it, and every check is an `fstat` of the descriptor that is then used: nothing is
checked by name and opened again (which a user could race by swapping a link in between).

When the caller is privileged (root, or holding CAP_SYS_NICE), every directory on the path as given
must be owned by root (or the caller's euid) and not world-writable, and the directory holding the
file and the file itself must also not be group-writable. A world-writable directory with the sticky
bit (like /tmp) is crossed only to what a trusted user owns: there nobody else can rename or replace
that entry. Higher directories may be group-writable (Ubuntu's /var/log is root:syslog 0775): that
group's members are trusted like root for them. A symlink is followed only when it sits in a
directory that passed these checks (in a sticky one it must be owned by a trusted user too); its
target is then walked the same way, at most MAX_LINKS links per path.

An unprivileged caller (a user running `policy check` on a checkout) has no power over other users'
processes, so the same walk runs with the ownership and mode checks off.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import RemediatorError

MAX_LINKS = 40  # as the kernel's own bound on symlinks followed in one lookup
CAP_SYS_NICE = 23

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class UntrustedPath(RemediatorError):
    """A file (or a directory or link on its path) that someone other than root could change."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"refusing {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Trust:
    """Who may own what a privileged remediator reads; `enforce` False checks nothing."""

    enforce: bool
    owners: frozenset[int] = frozenset({0})

    @classmethod
    def for_this_process(cls) -> "Trust":
        euid = os.geteuid()
        return cls(enforce=euid == 0 or _has_cap_sys_nice(), owners=frozenset({0, euid}))

    @classmethod
    def relaxed(cls) -> "Trust":
        return cls(enforce=False)


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: judge as if privileged


def _fix(path: str) -> str:
    return f"chown root:root {path} && chmod go-w {path}"


def _refuse(shown: str, where: str, why: str) -> UntrustedPath:
    subject = "it" if where == shown else where
    return UntrustedPath(
        shown,
        f"{subject} {why}; a root daemon acting on files another user can change would give that user "
        f"root's power over every process",
    )


def _check_owner(trust: Trust, shown: str, where: str, info: os.stat_result) -> None:
    if trust.enforce and info.st_uid not in trust.owners:
        raise _refuse(shown, where, f"is owned by uid {info.st_uid}, not root ({_fix(where)})")


def _check_writable(trust: Trust, shown: str, where: str, info: os.stat_result, bits: int) -> None:
    if trust.enforce and info.st_mode & bits:
        who = "group- or world-writable" if bits & stat.S_IWGRP else "world-writable"
        raise _refuse(shown, where, f"is {who} (mode {stat.S_IMODE(info.st_mode):04o}) ({_fix(where)})")


def _check_file(trust: Trust, shown: str, where: str, fd: int) -> os.stat_result:
    """The descriptor that will be read or written: a regular file, trusted owner, no other writer."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, f"{'it' if where == shown else where} is not a regular file", shown)
    _check_owner(trust, shown, where, info)
    _check_writable(trust, shown, where, info, stat.S_IWGRP | stat.S_IWOTH)
    return info


class _Walker:
    """One walk: a stack of directory descriptors from `/`, with the stat of each."""

    def __init__(self, path: str | Path, trust: Trust | None, *, create_mode: int | None = None, shown: str | None = None):
        self.path = str(path)
        self.shown = shown if shown is not None else self.path
        self.trust = trust if trust is not None else Trust.for_this_process()
        self.create_mode = create_mode  # create missing directories with this mode (None: refuse)
        self.links = 0
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.stack: list[tuple[int, str, os.stat_result]] = []
        self._push(root, "/")

    # -- helpers ------------------------------------------------------------------------------------
    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[0])

    def _where(self, name: str) -> str:
        parent = self.stack[-1][1]
        return parent.rstrip("/") + "/" + name

    def _check_owner(self, where: str, info: os.stat_result) -> None:
        _check_owner(self.trust, self.shown, where, info)

    def _check_writable(self, where: str, info: os.stat_result, bits: int) -> None:
        _check_writable(self.trust, self.shown, where, info, bits)

    def _push(self, fd: int, where: str) -> None:
        try:
            info = os.fstat(fd)
            self._check_owner(where, info)
            sticky = info.st_mode & stat.S_ISVTX
            self._check_writable(where, info, 0 if sticky else stat.S_IWOTH)
        except BaseException:
            os.close(fd)
            raise
        self.stack.append((fd, where, info))

    def _parent_is_sticky(self) -> bool:
        mode = self.stack[-1][2].st_mode
        return bool(mode & stat.S_ISVTX and mode & stat.S_IWOTH)

    def check_holding_directory(self) -> None:
        """The directory holding the file: not group-writable either, nor a sticky shared one."""
        _, where, info = self.stack[-1]
        self._check_writable(where, info, stat.S_IWGRP | stat.S_IWOTH)

    def follow(self, parent: int, name: str, pending: list[str]) -> None:
        """The entry `name` is a symlink: check it may be followed and queue its target."""
        where = self._where(name)
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        try:
            info = os.fstat(fd)
            if not stat.S_ISLNK(info.st_mode):
                raise _refuse(self.shown, where, "changed while it was opened")
            self.links += 1
            if self.links > MAX_LINKS:
                raise OSError(errno.ELOOP, f"more than {MAX_LINKS} symlinks on the way (a loop?)", self.shown)
            if self._parent_is_sticky():
                self._check_owner(where, info)  # anyone may plant a link in a sticky shared directory
            target = os.readlink("", dir_fd=fd)  # the link just checked, not one swapped in since
        finally:
            os.close(fd)
        if target.startswith("/"):
            while len(self.stack) > 1:
                os.close(self.stack.pop()[0])
        pending[:0] = target.split("/")

    # -- the walk -----------------------------------------------------------------------------------
    def walk_to_parent(self) -> str:
        """Walk every directory of the path; return the last name (opened by the caller)."""
        absolute = os.path.join(os.getcwd(), self.path)  # ".." is resolved on the real tree, not lexically
        return self.walk(absolute.split("/"))

    def walk_all(self) -> None:
        """Walk every component as a directory, the last one too."""
        self.walk(os.path.join(os.getcwd(), self.path).split("/"), enter_last=True)

    def walk(self, pending: list[str], enter_last: bool = False) -> str:
        while True:
            while pending and pending[0] in ("", "."):
                pending.pop(0)
            if not pending:
                return "."
            name = pending.pop(0)
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            if not enter_last and all(item in ("", ".") for item in pending):
                pending.clear()
                return name
            self.enter(name, pending)

    def enter(self, name: str, pending: list[str]) -> None:
        """Step into directory `name` (following a trusted symlink, creating it when asked)."""
        parent, _, _ = self.stack[-1]
        where = self._where(name)
        try:
            fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if self.create_mode is None:
                raise FileNotFoundError(errno.ENOENT, f"No such file or directory ({where} is missing)", self.shown) from None
            self.make_directory(name)
            fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        info = os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            os.close(fd)
            self.follow(parent, name, pending)
            return
        if not stat.S_ISDIR(info.st_mode):
            os.close(fd)
            raise NotADirectoryError(errno.ENOTDIR, f"{where} is not a directory", self.shown)
        self._push(fd, where)

    def make_directory(self, name: str) -> None:
        parent, _, _ = self.stack[-1]
        assert self.create_mode is not None
        try:
            os.mkdir(name, self.create_mode, dir_fd=parent)
        except FileExistsError:
            return  # made by someone else meanwhile: judged like any other
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, self.create_mode)  # the umask must not widen or narrow it
        finally:
            os.close(fd)
        fsync_directory(parent)  # the new name must survive a crash


def fsync_directory(dir_fd: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(exc: OSError, shown: str) -> OSError:
    """The same error, naming the path the caller gave rather than one component of it."""
    return type(exc)(exc.errno, exc.strerror, shown)


def write_durably(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, then fsync (the caller closes it and renames it into place)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def open_file(path: str | Path, trust: Trust | None = None, *, shown: str | None = None) -> int:
    """A read-only descriptor of the regular file at `path`, checked as the module docstring says."""
    walker = _Walker(path, trust, shown=shown)
    try:
        return _open_file(walker)
    except OSError as exc:
        raise _named(exc, walker.shown) from None
    finally:
        walker.close()


def _open_file(walker: _Walker) -> int:
    name = walker.walk_to_parent()
    while True:
        parent, _, _ = walker.stack[-1]
        if name == ".":
            raise IsADirectoryError(errno.EISDIR, "Is a directory", walker.shown)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise _named(exc, walker.shown) from None
            pending: list[str] = []
            walker.follow(parent, name, pending)
            name = walker.walk(pending)
            continue
        try:
            walker.check_holding_directory()
            _check_file(walker.trust, walker.shown, walker._where(name), fd)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


def read_bytes(path: str | Path, trust: Trust | None = None, *, shown: str | None = None) -> bytes:
    """The content of the checked file, read from the descriptor that was checked."""
    fd = open_file(path, trust, shown=shown)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


class TrustedDirectory:
    """A checked directory held open: list it and open its entries through its descriptor.

    create_mode: create the directory and any missing parent with this mode (the journal's and the
    audit log's directories); None: a missing one is an error.
    """

    def __init__(
        self, path: str | Path, trust: Trust | None = None, *, create_mode: int | None = None, shown: str | None = None
    ):
        self.path = Path(path)
        self.trust = trust if trust is not None else Trust.for_this_process()
        shown = shown if shown is not None else str(path)  # what errors name: the file it is opened for
        walker = _Walker(path, self.trust, create_mode=create_mode, shown=shown)
        try:
            walker.walk_all()
            path_fd, self.real_path, info = walker.stack[-1]
            self.fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=path_fd)
        except OSError as exc:
            raise _named(exc, shown) from None
        finally:
            walker.close()
        try:
            # What is opened in it must be safe from renames by others, too.
            _check_writable(self.trust, shown, self.real_path, info, stat.S_IWGRP | stat.S_IWOTH)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "TrustedDirectory":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def kind(self, name: str) -> str:
        """"file", "directory", "link" or "other" for an entry, without following it."""
        info = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            return "link"
        return "file" if stat.S_ISREG(info.st_mode) else "directory" if stat.S_ISDIR(info.st_mode) else "other"

    def open_file(self, name: str) -> int:
        """Read-only descriptor of entry `name`; a symlink is followed under the usual rule."""
        shown = str(self.path / name)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise _named(exc, shown) from None
            # A link in this checked directory: walk it from here (re-checking the way, by descriptor).
            return open_file(os.path.join(self.real_path, name), self.trust, shown=shown)
        try:
            _check_file(self.trust, shown, shown, fd)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_bytes(self, name: str) -> bytes:
        fd = self.open_file(name)
        try:
            return read_all(fd)
        finally:
            os.close(fd)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open (or create) entry `name` for writing: never through a symlink, a regular file a
        trusted user owns and no one else may write."""
        shown = str(self.path / name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UntrustedPath(shown, "it is a symlink; it must be a plain file") from None
            raise _named(exc, shown) from None
        try:
            _check_file(self.trust, shown, shown, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def replace(self, name: str, data: bytes, mode: int = 0o600) -> None:
        """Replace entry `name` with `data`, atomically and durably: a temporary file beside it
        (never through a symlink), fsync, rename over it, fsync of the directory. A crash leaves
        the old file or the new one. Raises OSError or UntrustedPath."""
        temp = f".{name}.{os.getpid()}.tmp"
        fd = self.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            try:
                os.fchmod(fd, mode)  # whatever the umask (the unit's is 0027)
                write_durably(fd, data)
            finally:
                os.close(fd)
            self.rename(temp, name)
        except OSError:
            try:
                os.unlink(temp, dir_fd=self.fd)
            except OSError:
                pass
            raise
        self.fsync()

    def rename(self, source: str, target: str) -> None:
        os.rename(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


def open_output(path: str | Path, mode: str = "w"):
    """A file a command writes where its user says (`report -o`, `record -o`, `replay --metrics`): created or
    truncated, never through a symbolic link at that name (root writing into a user's directory
    would otherwise write wherever the link points). Errors are RemediatorErrors naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RemediatorError(f"{path}: is a symbolic link: not written through it") from None
        raise RemediatorError(f"cannot write {path}: {exc.strerror or exc}") from None
    return os.fdopen(fd, mode)
