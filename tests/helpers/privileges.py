"""Why a privileged test cannot run here (None when it can). Checked once per session."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def root_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (run the tests with sudo)"
    return None


@functools.lru_cache(maxsize=None)
def bpf_unavailable_reason() -> str | None:
    from remediator.hostcheck import bpf_problem

    return bpf_problem()
