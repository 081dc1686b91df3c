"""What the kernel path needs, each missing piece as one line that says what to do."""

from __future__ import annotations

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
