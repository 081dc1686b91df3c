"""The kernel's CPU list format ("0-3,8,10-11"), as used by cpuset.cpus and /sys/devices/system/cpu/online."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .keptfile import KeptFile


class CpuListError(ValueError):
    pass


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse "0-3,5" into {0, 1, 2, 3, 5}. An empty string is the empty set."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return frozenset()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise CpuListError(f"empty element in CPU list {text!r}")
        low, sep, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise CpuListError(f"{part!r} is not a CPU number or range in {text!r}") from None
        if first < 0 or last < 0:
            raise CpuListError(f"negative CPU in {text!r}")
        if last < first:
            raise CpuListError(f"range {part!r} runs backwards in {text!r}")
        if last - first > 65535:
            raise CpuListError(f"range {part!r} is implausibly large")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format {0, 1, 2, 3, 5} as "0-3,5" (the form cpuset.cpus accepts)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        first = last = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == last + 1:
            index += 1
            last = ordered[index]
        parts.append(str(first) if first == last else f"{first}-{last}")
        index += 1
    return ",".join(parts)


_online_parsed: dict[str, tuple[bytes, frozenset[int]]] = {}  # path -> (text, CPUs): read every tick


def _online_from(path: str, text: bytes) -> frozenset[int]:
    """The CPUs of an online file's text, parsed again only when the text changed."""
    cached = _online_parsed.get(path)
    if cached is not None and cached[0] == text:
        return cached[1]
    cpus = parse_cpulist(text.decode())
    _online_parsed[path] = (text, cpus)
    return cpus


def online_cpus(sysfs_root: str | Path = "/sys") -> frozenset[int]:
    """CPUs the kernel has online now (read each time)."""
    path = f"{sysfs_root}/devices/system/cpu/online"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = os.read(fd, 65536)
    finally:
        os.close(fd)
    return _online_from(path, text)


class OnlineCpus:
    """online_cpus() for a caller that asks every tick (the daemon): through a KeptFile."""

    def __init__(self, sysfs_root: str | Path = "/sys"):
        self._file = KeptFile(f"{sysfs_root}/devices/system/cpu/online")

    def __call__(self) -> frozenset[int]:
        return _online_from(self._file.path, self._file.read())

    def close(self) -> None:
        self._file.close()
