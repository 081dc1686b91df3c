"""What the kernel path needs, each missing piece as one line that says what to do."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

from remediator import hostcheck


def test_missing_tracefs_says_how_to_mount_it(monkeypatch):
    monkeypatch.setattr(hostcheck.os, "geteuid", lambda: 0)
    monkeypatch.setattr(hostcheck, "tracefs_root", lambda: None)
    problem = hostcheck.bpf_problem()
    assert problem.startswith("tracefs is not mounted") and "mount -t tracefs nodev /sys/kernel/tracing" in problem


def test_not_root(monkeypatch):
    monkeypatch.setattr(hostcheck.os, "geteuid", lambda: 1000)
    assert hostcheck.bpf_problem() == "eBPF needs root (CAP_BPF and CAP_PERFMON): run with sudo"


def test_missing_headers_point_at_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setattr(hostcheck, "Path", lambda *parts: tmp_path.joinpath(*[p.lstrip("/") for p in parts]))
    problem = hostcheck.kernel_headers_problem("9.9.9-test")
    assert "no kernel header tree" in problem and "./bootstrap setup" in problem


def test_tracefs_without_sched_events_is_named_as_such(tmp_path, monkeypatch):
    (tmp_path / "events").mkdir()
    monkeypatch.setattr(hostcheck.os, "geteuid", lambda: 0)
    monkeypatch.setattr(hostcheck, "TRACEFS_CANDIDATES", (str(tmp_path),))
    problem = hostcheck.bpf_problem()
    assert problem.startswith("the kernel exposes no sched tracepoints") and str(tmp_path) in problem


# -- /lib/modules hidden by a service sandbox (systemd's ProtectKernelModules=yes) -----------------

SANDBOX_WORDS = ("is not accessible to this process", "ProtectKernelModules=yes", "bcc needs the kernel header tree under")


def test_an_unreadable_modules_root_is_named_as_a_sandbox(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    modules.mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(modules)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(hostcheck.os, "stat", stat)
    problem = hostcheck.kernel_headers_problem("9.9.9-test", modules_root=modules)
    assert problem == (
        f"{modules} is not accessible to this process (a service sandbox such as systemd's ProtectKernelModules=yes "
        f"hides it): bcc needs the kernel header tree under {modules}/9.9.9-test/build"
    )


def test_an_empty_mode_0000_modules_root_is_named_as_a_sandbox(tmp_path):
    # What systemd mounts over /lib/modules: an empty directory with mode 0000. A process with
    # CAP_DAC_READ_SEARCH (root here, and the unit keeps it) can read it, and finds nothing; a
    # process without it cannot: the same answer either way.
    modules = tmp_path / "modules"
    modules.mkdir(mode=0)
    os.chmod(modules, 0)
    try:
        problem = hostcheck.kernel_headers_problem("9.9.9-test", modules_root=modules)
    finally:
        os.chmod(modules, 0o755)
    assert all(word in problem for word in SANDBOX_WORDS), problem


@pytest.mark.root
def test_a_really_unreadable_modules_root_without_dac_capabilities(tmp_path):
    """A real EACCES: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, as in a unit's sandbox."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")
    modules = tmp_path / "modules"
    (modules / "9.9.9-test" / "build").mkdir(parents=True)
    os.chmod(modules, 0o700)
    os.chown(modules, 65534, 65534)  # owned by nobody: root reads it only through its DAC capabilities
    code = f"from remediator import hostcheck; print(hostcheck.kernel_headers_problem('9.9.9-test', modules_root={str(modules)!r}))"
    out = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert all(word in out.stdout for word in SANDBOX_WORDS), out.stdout
    assert f"under {modules}/9.9.9-test/build" in out.stdout


def test_permission_denied_deeper_in_the_tree_names_the_path(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    build = modules / "9.9.9-test" / "build"
    build.mkdir(parents=True)
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(build)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(hostcheck.os, "stat", stat)
    problem = hostcheck.kernel_headers_problem("9.9.9-test", modules_root=modules)
    assert problem.startswith(f"{build}/include/generated/autoconf.h is not accessible to this process")
    assert "no kernel header tree" not in problem


# -- Debian's perf_event_paranoid level 3 ---------------------------------------------------------

DENIED = "perf_event_open(/sys/kernel/debug/tracing/events/sched/sched_switch/id): Permission denied"


def _perf_files(tmp_path, paranoid: int, cap_eff: str):
    paranoid_path = tmp_path / "perf_event_paranoid"
    paranoid_path.write_text(f"{paranoid}\n")
    status_path = tmp_path / "status"
    status_path.write_text(f"Name:\tremediator\nCapEff:\t{cap_eff}\n")
    return str(paranoid_path), str(status_path)


def test_perf_hint_names_debians_paranoid_level_and_both_remedies(tmp_path):
    from remediator.hostcheck import perf_permission_hint

    # The unit's five capabilities: CAP_DAC_READ_SEARCH, SYS_PTRACE, SYS_NICE, PERFMON, BPF.
    hint = perf_permission_hint(DENIED, *_perf_files(tmp_path, 3, "000000c000880004"))
    assert "kernel.perf_event_paranoid is 3" in hint
    assert "kernel.perf_event_paranoid=2" in hint and "CAP_SYS_ADMIN" in hint


def test_no_perf_hint_where_it_is_not_the_cause(tmp_path):
    from remediator.hostcheck import perf_permission_hint

    assert perf_permission_hint(DENIED, *_perf_files(tmp_path, 2, "000000c000880004")) == ""
    assert perf_permission_hint(DENIED, *_perf_files(tmp_path, 3, "000001ffffffffff")) == ""  # has CAP_SYS_ADMIN
    assert perf_permission_hint("open(x): No such file or directory", *_perf_files(tmp_path, 3, "0")) == ""
