"""Shared bits of the workload scripts (stdlib only: they run under any python3)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

PR_SET_NAME = 15


def set_thread_name(name: str) -> None:
    """Set the calling thread's comm (truncated by the kernel to 15 characters)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def announce_ready(**fields: object) -> None:
    """One line on stdout that the spawning test waits for."""
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    sys.stdout.write(f"ready pid={os.getpid()} {text}\n")
    sys.stdout.flush()
