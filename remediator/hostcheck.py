"""What the kernel path needs from the host, each missing piece as one line that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
SETUP_HINT = "run 'sudo ./bootstrap setup' from the remediator checkout"


def tracefs_root() -> Path | None:
    """Where tracefs is mounted (with its events), or None."""
    for candidate in TRACEFS_CANDIDATES:
        if Path(candidate, "events").is_dir():
            return Path(candidate)
    return None


MODULES_ROOT = "/lib/modules"


class _Inaccessible(Exception):
    """A path on the way to the header tree that this process may not look at."""


def _exists(path: Path) -> bool:
    # Path.exists() raises PermissionError (Python < 3.12) where a sandbox hides a directory:
    # that is a different problem from a missing tree and gets its own message.
    try:
        os.stat(path)
    except PermissionError:
        raise _Inaccessible(path) from None
    except OSError:
        return False
    return True


def _hidden_by_sandbox(modules_root: Path) -> bool:
    """systemd's ProtectKernelModules=yes (like InaccessiblePaths=) mounts an empty mode-0000
    directory over /lib/modules: unreadable without CAP_DAC_READ_SEARCH, and empty with it."""
    try:
        info = os.stat(modules_root)
        entries = os.listdir(modules_root)
    except PermissionError:
        return True
    except OSError:
        return False  # no /lib/modules at all: the "no kernel header tree" message says what to do
    return info.st_mode & 0o7777 == 0 and not entries


def kernel_headers_problem(release: str | None = None, modules_root: Path | str | None = None) -> str | None:
    """Why bcc cannot find the running kernel's header tree, or None. `modules_root` is
    /lib/modules unless a test points it elsewhere."""
    release = release or os.uname().release
    modules_root = Path(modules_root if modules_root is not None else MODULES_ROOT)
    moddir = modules_root / release
    if _hidden_by_sandbox(modules_root):
        return (
            f"{modules_root} is not accessible to this process (a service sandbox such as systemd's "
            f"ProtectKernelModules=yes hides it): bcc needs the kernel header tree under {moddir}/build"
        )
    try:
        if not _exists(moddir / "build/include/generated/autoconf.h"):
            return f"no kernel header tree at {moddir}/build: {SETUP_HINT} (it installs the distribution's headers)"
        if not (_exists(moddir / "build/include/linux/kconfig.h") or _exists(moddir / "source/include/linux/kconfig.h")):
            return f"incomplete kernel header tree at {moddir} (no include/linux/kconfig.h): {SETUP_HINT}"
    except _Inaccessible as exc:
        return (
            f"{exc.args[0]} is not accessible to this process (permission denied on the way to it): bcc needs "
            f"to read the kernel header tree under {moddir}/build"
        )
    return None


def kernel_headers_description(release: str | None = None) -> str:
    release = release or os.uname().release
    marker = Path(MODULES_ROOT, release, ".remediator-headers")
    if marker.exists():
        return marker.read_text().strip()
    return f"the running kernel's ({Path(MODULES_ROOT, release, 'build').resolve()})"


def bpf_problem() -> str | None:
    """Why the eBPF probes cannot load here, or None when everything they need is present."""
    if os.geteuid() != 0:
        return "eBPF needs root (CAP_BPF and CAP_PERFMON): run with sudo"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return f"the bcc Python module is not importable (Debian package python3-bpfcc): {SETUP_HINT}"
    root = tracefs_root()
    if root is None:
        return "tracefs is not mounted (no /sys/kernel/tracing/events): mount -t tracefs nodev /sys/kernel/tracing"
    if not (root / "events/sched/sched_switch/format").exists():
        return f"the kernel exposes no sched tracepoints under {root}/events (CONFIG_TRACEPOINTS missing)"
    return kernel_headers_problem()


CAP_SYS_ADMIN = 21
PERF_PARANOID = "/proc/sys/kernel/perf_event_paranoid"


def perf_permission_hint(error_text: str, paranoid_path: str = PERF_PARANOID, status_path: str = "/proc/self/status") -> str:
    """Why attaching to a tracepoint was refused, when the reason is Debian's perf_event_paranoid
    level 3: a distribution patch under which only CAP_SYS_ADMIN may call perf_event_open (upstream
    CAP_PERFMON, which the unit keeps, is then not enough). '' when that is not the cause."""
    if "perf_event_open" not in error_text or "denied" not in error_text.lower():
        return ""
    try:
        paranoid = int(Path(paranoid_path).read_text().strip())
        effective = next(line for line in Path(status_path).read_text().splitlines() if line.startswith("CapEff:"))
    except (OSError, ValueError, StopIteration):
        return ""
    if paranoid <= 2 or int(effective.split()[1], 16) & (1 << CAP_SYS_ADMIN):
        return ""
    return (
        f"kernel.perf_event_paranoid is {paranoid}: this kernel (Debian's patch) then lets only CAP_SYS_ADMIN attach to "
        "tracepoints; set it to upstream's default 2 (echo kernel.perf_event_paranoid=2 > /etc/sysctl.d/60-remediator.conf "
        "&& sysctl -p /etc/sysctl.d/60-remediator.conf), or give the daemon CAP_SYS_ADMIN"
    )
