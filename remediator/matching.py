"""Which processes a policy matches: the checks on each glob and regex, and the compiled `Match`.

A policy's `[policy.match]` table gives any of comm, exe, cmdline, cgroup, unit, user, ancestor.
Every field given must match (AND); a field's list matches when any of its items does (OR).
Globs are fnmatch patterns (`*`, `?`, `[...]`), compiled once; `*` also matches `/`.
"""

from __future__ import annotations

import fnmatch
import pwd
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Pattern

from .procfs import ProcessInfo, system_units
from .selectors import normalize_cgroup_path, normalize_unit

COMM_LENGTH = 15  # TASK_COMM_LEN - 1: the kernel cuts longer names
FIELDS = ("comm", "exe", "cmdline", "cgroup", "unit", "user", "ancestor")
_WILDCARDS = "*?["


# -- checks (raise ValueError with the message; return the normalised item) ----------------------

def _glob_tokens(glob: str) -> Iterator[str]:
    """Split a glob into fnmatch tokens: '*', '?', a '[...]' class, or one literal character.

    Raises ValueError for a '[' that is never closed (fnmatch would silently take it literally).
    """
    index = 0
    while index < len(glob):
        char = glob[index]
        if char == "[":
            end = index + 1
            if end < len(glob) and glob[end] == "!":
                end += 1
            if end < len(glob) and glob[end] == "]":
                end += 1
            end = glob.find("]", end)
            if end < 0:
                raise ValueError(f"glob {_quote(glob)} has a '[' that is never closed; a literal '[' is written '[[]'")
            yield glob[index : end + 1]
            index = end + 1
        else:
            yield char
            index += 1


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_glob(glob: str) -> str:
    list(_glob_tokens(glob))
    return glob


def check_comm_glob(glob: str) -> str:
    """A comm glob must be able to match a name of at most 15 characters."""
    tokens = list(_glob_tokens(glob))
    needed = sum(1 for token in tokens if token != "*")
    if needed > COMM_LENGTH:
        if not any(char in glob for char in _WILDCARDS):
            raise ValueError(
                f"comm {_quote(glob)} is {len(glob)} characters and can never match: the kernel cuts comm to "
                f"{COMM_LENGTH} characters, so write {_quote(glob[:COMM_LENGTH])} (or match on exe or cmdline)"
            )
        raise ValueError(
            f"comm glob {_quote(glob)} needs at least {needed} characters and can never match: the kernel cuts "
            f"comm to {COMM_LENGTH} characters (match on exe or cmdline instead)"
        )
    return glob


def check_exe_glob(glob: str) -> str:
    check_glob(glob)
    if not glob.startswith(("/", "*", "?", "[")):
        raise ValueError(
            f"exe {_quote(glob)} is not an absolute path: exe is the full path of the executable, "
            f"e.g. '*/{glob}'"
        )
    return glob


def check_cgroup_glob(glob: str) -> str:
    check_glob(glob)
    if glob.startswith("/sys/fs/cgroup"):
        inner = normalize_cgroup_path(glob) if not any(c in glob for c in _WILDCARDS) else glob[len("/sys/fs/cgroup") :] or "/"
        raise ValueError(f"cgroup {_quote(glob)} is a mount path; write the path inside the hierarchy, e.g. {_quote(inner)}")
    if not glob.startswith(("/", "*", "?", "[")):
        raise ValueError(f"cgroup {_quote(glob)} must start with '/' (a path inside the hierarchy, e.g. '/system.slice/{glob}')")
    return glob.rstrip("/") or "/"


def check_unit_glob(glob: str) -> str:
    check_glob(glob)
    if "/" in glob:
        raise ValueError(f"unit {_quote(glob)} contains '/': give a unit name such as 'fluent-bit.service' (or use cgroup for paths)")
    return glob if "." in glob or glob.endswith("*") else glob + ".service"


def check_user(name: str) -> str:
    if any(char.isspace() for char in name) or ":" in name or "/" in name:
        raise ValueError(f"user {_quote(name)} is not a user name or numeric uid")
    return name


def resolve_protect_user(item: str | int) -> int:
    """A `[protect] users` item, a user name or a uid, as a uid; a name must exist on this host."""
    if isinstance(item, int):
        if not 0 <= item < 2**32 - 1:
            raise ValueError(f"uid {item} is out of range (0..{2**32 - 2})")
        return item
    try:
        return pwd.getpwnam(item).pw_uid
    except KeyError:
        hint = f" (a uid is written without quotes: {item})" if item.isdigit() else ""
        raise ValueError(f"user {_quote(item)} does not exist on this host{hint}") from None


def compile_regex(pattern: str) -> Pattern[str]:
    # re warns (FutureWarning) about some valid patterns, e.g. "[[a]"; the pattern is the user's
    # and compiles, so the warning would only be noise in the daemon's log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return re.compile(pattern)


def check_regex(pattern: str) -> str:
    try:
        compile_regex(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise ValueError(f"regex {_quote(pattern)} does not compile: {exc}") from None
    return pattern


# The ending a group of ours takes for another user's offenders (placement.per_user_name): no
# policy name or cpuset `cgroup` may end so, or one policy's group could be another user's.
PER_USER_SUFFIX = re.compile(r"\.uid[0-9]+$")  # ASCII digits only, as per_user_name writes them


def check_not_per_user(name: str) -> str:
    if PER_USER_SUFFIX.search(name):
        raise ValueError(f"{_quote(name)} ends like a per-user group of remediator's ('.uid' and digits, "
                         "for other users' offenders): choose another name")
    return name


def check_cgroup_name(name: str) -> str:
    if name in (".", ".."):
        raise ValueError(f"cgroup name {_quote(name)} is not a plain name")
    return check_not_per_user(name)


def check_protect_cgroup(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"cgroup {_quote(path)} must be an absolute path such as '/system.slice/api.service'")
    return normalize_cgroup_path(path)


def check_protect_unit(name: str) -> str:
    if "/" in name or any(char.isspace() for char in name):
        raise ValueError(f"unit {_quote(name)} is not a unit name such as 'api.service'")
    return normalize_unit(name)


# -- compiled match -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MatchResult:
    fields: tuple[str, ...]  # which fields matched, e.g. ("comm", "ancestor")
    detail: str  # "comm fluent-bit matches 'fluent-bit'"


@dataclass(frozen=True)
class Glob:
    text: str
    regex: Pattern[str]

    @classmethod
    def compile(cls, text: str) -> "Glob":
        return cls(text, re.compile(fnmatch.translate(text), re.DOTALL))

    def matches(self, value: str) -> bool:
        return self.regex.match(value) is not None


def _globs(items: tuple[str, ...]) -> tuple[Glob, ...]:
    return tuple(Glob.compile(item) for item in items)


def _cgroup_and_parents(path: str) -> list[str]:
    """'/a/b/c' -> ['/a/b/c', '/a/b', '/a', '/']: a cgroup glob may name the process's cgroup or a parent."""
    chain = [path]
    while path not in ("", "/"):
        path = path.rsplit("/", 1)[0] or "/"
        chain.append(path)
    return chain


def units_of(info: ProcessInfo) -> list[str]:
    """The system manager's units the process is in, innermost first: its service or scope, then
    its slices. Names inside a unit's delegated subtree (a user's user@UID.service) do not count
    (see procfs.system_units): a user's process must not be matched as a system service."""
    if not info.cgroup:
        return [info.unit] if info.unit else []  # a recorded process without its path
    return list(reversed(system_units(info.cgroup)))


@dataclass(frozen=True)
class Match:
    """The compiled `[policy.match]` table. Empty tuples / None mean "not given"."""

    comm: tuple[Glob, ...] = ()
    exe: tuple[Glob, ...] = ()
    cmdline: Pattern[str] | None = None
    cgroup: tuple[Glob, ...] = ()
    unit: tuple[Glob, ...] = ()
    user: tuple[str, ...] = ()
    ancestor: tuple[Glob, ...] = ()
    descendants: bool = False  # the match covers the matched process's descendants (see trees.py)

    @classmethod
    def build(
        cls,
        comm: tuple[str, ...] = (),
        exe: tuple[str, ...] = (),
        cmdline: str | None = None,
        cgroup: tuple[str, ...] = (),
        unit: tuple[str, ...] = (),
        user: tuple[str, ...] = (),
        ancestor: tuple[str, ...] = (),
        descendants: bool = False,
    ) -> "Match":
        """From checked items (see the check_* functions)."""
        return cls(
            comm=_globs(comm),
            exe=_globs(exe),
            cmdline=compile_regex(cmdline) if cmdline is not None else None,
            cgroup=_globs(cgroup),
            unit=_globs(unit),
            user=tuple(user),
            ancestor=_globs(ancestor),
            descendants=descendants,
        )

    @cached_property
    def given(self) -> tuple[str, ...]:  # made once: matches() asks it for every process and policy
        return tuple(name for name in FIELDS if getattr(self, name))

    @property
    def specificity(self) -> int:
        """The number of fields given: more fields, narrower match, higher precedence at equal priority."""
        return len(self.given)

    def selector_values(self) -> Iterator[tuple[str, str]]:
        """(field, value as written) for every item: what two policies can share."""
        for name in FIELDS:
            value = getattr(self, name)
            if name == "cmdline":
                if value is not None:
                    yield name, value.pattern
            elif name == "user":
                for item in value:
                    yield name, item
            else:
                for glob in value:
                    yield name, glob.text

    def to_json(self) -> dict:
        result: dict[str, object] = {}
        for name, value in self.selector_values():
            if name == "cmdline":
                result[name] = value
            else:
                result.setdefault(name, []).append(value)  # type: ignore[union-attr]
        if self.descendants:
            result["descendants"] = True
        return result

    def matches(self, info: ProcessInfo) -> MatchResult | None:
        """Which fields matched and how, or None when any given field does not match."""
        if not self.given:
            return None
        details: list[str] = []
        for name in self.given:
            detail = getattr(self, "_match_" + name)(info)
            if detail is None:
                return None
            details.append(detail)
        return MatchResult(self.given, "; ".join(details))

    def _match_comm(self, info: ProcessInfo) -> str | None:
        for glob in self.comm:
            if glob.matches(info.comm):
                return f"comm {info.comm} matches {_quote(glob.text)}"
        return None

    def _match_exe(self, info: ProcessInfo) -> str | None:
        if not info.exe:
            return None  # kernel threads, or not readable: an exe glob cannot be judged
        for glob in self.exe:
            if glob.matches(info.exe):
                return f"exe {info.exe} matches {_quote(glob.text)}"
        return None

    def _match_cmdline(self, info: ProcessInfo) -> str | None:
        assert self.cmdline is not None
        if not info.cmdline:
            return None
        joined = " ".join(info.cmdline)
        found = self.cmdline.search(joined)
        if found is None:
            return None
        return f"cmdline matches /{self.cmdline.pattern}/ at {found.group(0)[:40]!r}"

    def _match_cgroup(self, info: ProcessInfo) -> str | None:
        if not info.cgroup:
            return None
        for glob in self.cgroup:
            for path in _cgroup_and_parents(info.cgroup):
                if glob.matches(path):
                    where = info.cgroup if path == info.cgroup else f"{info.cgroup} (under {path})"
                    return f"cgroup {where} matches {_quote(glob.text)}"
        return None

    def _match_unit(self, info: ProcessInfo) -> str | None:
        units = units_of(info)
        for glob in self.unit:
            for unit in units:
                if glob.matches(unit):
                    return f"unit {unit} matches {_quote(glob.text)}"
        return None

    def _match_user(self, info: ProcessInfo) -> str | None:
        for name in self.user:
            if name == info.user or (name.isdigit() and int(name) == info.uid):
                return f"user {info.user or info.uid} matches {_quote(name)}"
        return None

    def _match_ancestor(self, info: ProcessInfo) -> str | None:
        for pid, comm in info.ancestors:
            for glob in self.ancestor:
                if glob.matches(comm):
                    return f"ancestor {comm} (pid {pid}) matches {_quote(glob.text)}"
        return None

