"""Process-controlled text cannot forge log entries or drive a terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remediator.cli import configure_logging
from remediator.printable import printable


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("fluent-bit", "fluent-bit"),
        ("x\n<0>forged", "x\\n<0>forged"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
        ("\x9b31m", "\\x9b31m"),
        ("ünïcode ok", "ünïcode ok"),
        ("line\u2028sep", "line\\u2028sep"),
        ("tib-tneulf\u202e", "tib-tneulf\\u202e"),  # right-to-left override: would read "fluent-bit"
        ("a\u2066b\u2069c\u200fd", "a\\u2066b\\u2069c\\u200fd"),  # isolates, a right-to-left mark
        ("עברית", "עברית"),  # right-to-left text itself is fine
    ],
)
def test_printable(raw, shown):
    assert printable(raw) == shown


def test_a_log_record_with_a_hostile_name_stays_one_line(capsys):
    configure_logging(False)
    logging.getLogger("remediator").info("would change pid %d (%s)", 42, "x\n<0>remediator: fake emergency")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "x\\n<0>remediator: fake emergency" in err


@pytest.mark.root
def test_a_real_process_named_to_forge_a_line_is_logged_escaped(tmp_path, spawn):
    """A real process renames itself with a newline and a journald priority in its comm; the
    daemon names it (a policy governs it) in one escaped line, and no line of its log is forged."""
    from helpers.daemon import REMEDIATOR, SHIPPER_POLICY, write_config

    script = tmp_path / "rename.py"
    script.write_text(
        "import ctypes, time\n"
        "ctypes.CDLL(None).prctl(15, b'fb\\n<0>forged', 0, 0, 0)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = spawn([sys.executable, str(script)])
    assert Path(f"/proc/{proc.pid}/comm").read_text() == "fb\n<0>forged\n"
    policy = SHIPPER_POLICY.format(above="1ms", windows=2).replace('comm = ["fluent-bit"]', 'comm = ["fb*"]')
    # The protected service is a process of its own: a child of the service (this test's process
    # would be its parent) is off limits and no policy governs it.
    service = spawn([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"])
    config = write_config(tmp_path, [service.pid], mode="dry-run", policy_text=policy)
    out = subprocess.run([REMEDIATOR, "run", "--config", str(config), "--source", "procfs", "--ticks", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert any(f"fb\\n<0>forged ({proc.pid})" in line for line in lines), out.stderr
    assert not [line for line in lines if line.startswith(("<0>", "forged"))], out.stderr
