"""Processes remediator must never change, whatever a policy says.

One function decides it, so `policy explain`, the engine and the executor agree on the reasons.
"""

from __future__ import annotations

import os
from typing import Collection

from .procfs import ProcessInfo


def exclusion_reason(
    info: ProcessInfo,
    protected_pids: Collection[int],
    self_pid: int | None = None,
) -> str | None:
    """Why `info` is off limits, or None when a policy may act on it."""
    self_pid = os.getpid() if self_pid is None else self_pid
    if info.pid == 1:
        return "PID 1 (init)"
    if info.kernel_thread:
        return "kernel thread"
    if info.pid == self_pid:
        return "remediator itself"
    if any(ancestor_pid == self_pid for ancestor_pid, _ in info.ancestors):
        return "a child of remediator"
    if info.pid in protected_pids:
        return "protected service"
    return None
