"""promtool (Debian's prometheus package, a test package of ./bootstrap): the rules and the
exposition format are checked by Prometheus's own tool. Without it a test skips, and fails in CI
(REMEDIATOR_REQUIRE_PRIVILEGED=1), where a skip would hide an unchecked alert."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PROMTOOL = shutil.which("promtool")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        reason = "promtool is not installed (apt-get install prometheus, or ./bootstrap test)"
        if os.environ.get("REMEDIATOR_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"CI must check the rules and metrics: {reason}", pytrace=False)
        pytest.skip(reason)
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120)
