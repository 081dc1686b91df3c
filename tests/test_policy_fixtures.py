"""One fixture per error class: tests/fixtures/policy/<case>/ holds the TOML files and expected.txt,
the exact diagnostics `policy check` prints for that directory (paths relative to it, `{dir}` for
its absolute path). Checked with online CPUs 0-1, so the host-CPU warning does not depend on the
machine running the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.commands.policy import run_check
from remediator.policy import check_paths

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policy"
CASES = sorted(path.name for path in FIXTURES.iterdir() if path.is_dir())
ONLINE = frozenset({0, 1})


def expected_lines(case: str) -> list[str]:
    text = (FIXTURES / case / "expected.txt").read_text()
    return text.replace("{dir}", str(FIXTURES / case)).splitlines()


def test_every_error_class_has_a_fixture():
    required = {
        "syntax-error", "unknown-key", "wrong-type", "nice-out-of-range", "bad-glob", "comm-too-long", "bad-regex",
        "malformed-cpulist", "host-missing-cpu", "duplicate-names", "empty-ladder", "conflicting-selectors",
        "bare-number-duration", "missing-required-key", "always-with-tail", "not-utf8", "two-actions-in-one-step",
        "bad-enum", "windows-more-than-of", "fewer-than-min-cpus", "empty-match", "exe-not-absolute",
        "cgroup-mount-path", "trigger-without-tail", "policy-not-array", "negative-nice", "no-policy",
        "config-errors", "config-empty-protect", "config-unknown-key", "cpu-alone", "relative-threshold",
    }
    assert required <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_fixture_diagnostics(case, monkeypatch):
    monkeypatch.chdir(FIXTURES / case)
    found = [str(d) for d in check_paths(["."], online_cpus=ONLINE)]
    assert found == expected_lines(case)


@pytest.mark.parametrize("case", CASES)
def test_fixture_exit_status(case, monkeypatch, capsys):
    """The command exits 1 exactly when there is an error; warnings alone pass."""
    import argparse

    monkeypatch.chdir(FIXTURES / case)
    args = argparse.Namespace(paths=["."], format="text", online_cpus=ONLINE, sysfs_root="/sys")
    status = run_check(args)
    out = capsys.readouterr().out.splitlines()
    assert out == expected_lines(case)
    has_error = any(": error: " in line for line in out)
    assert status == (1 if has_error else 0)
