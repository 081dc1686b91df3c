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


def kernel_headers_problem(release: str | None = None) -> str | None:
    release = release or os.uname().release
    moddir = Path("/lib/modules", release)
    if not (moddir / "build/include/generated/autoconf.h").exists():
        return f"no kernel header tree at {moddir}/build: {SETUP_HINT} (it installs the distribution's headers)"
    if not ((moddir / "build/include/linux/kconfig.h").exists() or (moddir / "source/include/linux/kconfig.h").exists()):
        return f"incomplete kernel header tree at {moddir} (no include/linux/kconfig.h): {SETUP_HINT}"
    return None


def kernel_headers_description(release: str | None = None) -> str:
    release = release or os.uname().release
    marker = Path("/lib/modules", release, ".remediator-headers")
    if marker.exists():
        return marker.read_text().strip()
    return f"the running kernel's ({Path('/lib/modules', release, 'build').resolve()})"


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
