"""The compiled model the engine consumes, the shipped policies, and the purity of compiling."""

from __future__ import annotations

import builtins
import dataclasses
import os
from pathlib import Path

import pytest

from remediator.errors import Location
from remediator.placement import auto_request_cpus, owned_cgroup_name, resolve_cpu_spec, unprotected_cpus
from remediator.model import CpuSpec, Step
from remediator.policy import PolicyErrors, check_paths, compile_policies, load_policies
from remediator.procfs import ProcessInfo
from remediator.tomlpos import parse

ROOT = Path(__file__).resolve().parent.parent

FULL = """\
[[policy]]
name = "log-shippers"
description = "all the parts"
priority = 3
[policy.match]
comm = ["fluent-bit"]
[policy.trigger]
tail = { percentile = 99.9, above = "2ms", windows = 2, of = 4 }
offender = { cpu = 0.5, cpu_kind = "peak", blame_share = 0.2, require = "all" }
[[policy.actions]]
nice = 10
settle = "3s"
[[policy.actions]]
affinity = "2-3,6"
[[policy.actions]]
cpuset = { cpus = "unprotected", cgroup = "log-shippers" }
settle = "1.5m"
[policy.limits]
revert_after_quiet = "never"
min_cpus = 2
"""


def compile_text(text: str, online=None):
    compiled, diagnostics = compile_policies(parse(text, "p.toml"), online)
    return [item.policy for item in compiled], diagnostics


def test_compiled_values_units_and_defaults():
    (policy,), diagnostics = compile_text(FULL)
    assert diagnostics == []
    assert (policy.name, policy.priority, policy.location) == ("log-shippers", 3, Location("p.toml", 1, 1))
    trigger = policy.trigger
    assert (trigger.always, trigger.tail_percentile, trigger.tail_above_us) == (False, 99.9, 2000.0)
    assert (trigger.windows, trigger.of_windows) == (2, 4)
    assert (trigger.offender_cpu, trigger.offender_cpu_kind, trigger.offender_blame_share, trigger.offender_require) == (
        0.5, "peak", 0.2, "all",
    )
    nice, affinity, cpuset = policy.steps
    assert nice == Step("nice", 3.0, Location("p.toml", 10, 1), {"nice": 10})
    assert affinity.settle_s == 5.0  # the default
    assert affinity.params["cpus"] == CpuSpec(unprotected=False, cpus=frozenset({2, 3, 6}))
    assert cpuset.params["cpus"] == CpuSpec(unprotected=True) and cpuset.params["cpus"].cpus == frozenset()
    assert (cpuset.params["cgroup"], cpuset.settle_s, cpuset.location.line) == ("log-shippers", 90.0, 15)
    assert [step.describe() for step in policy.steps] == ["nice 10", "affinity 2-3,6", "cpuset unprotected in cgroup log-shippers"]
    limits = policy.limits
    assert (limits.cooldown_s, limits.max_actions_per_hour, limits.revert_after_quiet_s, limits.min_cpus) == (60.0, 6, None, 2)


def test_always_trigger_and_limit_defaults():
    (policy,), _ = compile_text(
        '[[policy]]\nname = "a"\ndescription = "d"\nmatch.comm = "x"\ntrigger.always = true\n[[policy.actions]]\nnice = 19\n'
    )
    assert policy.trigger.always and policy.trigger.tail_above_us is None and policy.trigger.offender_cpu is None
    assert policy.limits.revert_after_quiet_s == 600.0
    assert policy.trigger.describe() == "always (static placement at exec)"


def test_the_model_is_frozen():
    (policy,), _ = compile_text(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.steps[0].params = {"nice": 1}  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.steps[0].params["nice"] = 1  # type: ignore[index]
    hash(policy.steps[0])


def test_host_cpu_warning_needs_the_online_set_and_does_not_reject():
    (policy,), diagnostics = compile_text(FULL, online=frozenset({0, 1}))
    assert [str(d) for d in diagnostics] == [
        "p.toml:14:12: warning: policy[0].actions[1].affinity: CPUs 2-3,6 are not online on this host (online: 0-1)"
    ]
    assert policy.steps[1].params["cpus"].cpus == frozenset({2, 3, 6})


def test_compiling_reads_nothing_from_proc_or_sys(monkeypatch):
    document = parse(FULL, "p.toml")
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).startswith(("/proc", "/sys")):
            raise AssertionError(f"compile read {file}")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "listdir", lambda *a: (_ for _ in ()).throw(AssertionError("listdir")))
    monkeypatch.setattr(os, "sched_getaffinity", lambda *a: (_ for _ in ()).throw(AssertionError("affinity")))
    compiled, _ = compile_policies(document, frozenset({0, 1}))
    assert len(compiled) == 1


def test_load_policies_raises_every_error_and_keeps_warnings(tmp_path):
    (tmp_path / "a.toml").write_text(FULL.replace("nice = 10", "nice = 99").replace('"2-3,6"', '"2-"'))
    with pytest.raises(PolicyErrors) as caught:
        load_policies([tmp_path])
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{tmp_path}/a.toml:11:8: error: policy[0].actions[0].nice: 99 is out of range (-20..19)",
        f'{tmp_path}/a.toml:14:12: error: policy[0].actions[1].affinity: "2-" is not a CPU list or "unprotected": '
        'use numbers and ranges separated by commas, e.g. "2-3,6"',
    ]
    (tmp_path / "a.toml").write_text(FULL)
    policies = load_policies([tmp_path], online_cpus=frozenset({0, 1}))
    assert [d.code for d in policies.warnings] == ["host-cpu"]


def test_load_policies_reports_a_missing_path():
    with pytest.raises(PolicyErrors, match="no-such-dir: error: no such file or directory"):
        load_policies(["no-such-dir"])


# -- shipped policies ---------------------------------------------------------------------------------

def test_shipped_policies_and_example_config_check_clean():
    assert check_paths([ROOT / "policies", ROOT / "examples" / "remediator.toml"], online_cpus=frozenset({0, 1})) == []


def test_shipped_policies_are_conservative_ladders():
    policies = load_policies([ROOT / "policies"])
    names = {policy.name for policy in policies.policies}
    assert {"log-shippers", "fluentd", "logstash", "telegraf", "datadog-agent", "logrotate",
            "logrotate-compressors", "updatedb", "man-db", "restic", "borg"} <= names
    # A priority step first (nice, or the cgroup's idle/weight, which also works between units):
    # the gentlest, instantly reversible; never a CPU cap (cpu_max) first.
    order = {"nice": 0, "cpu": 0, "affinity": 1, "cpuset": 2}
    for policy in policies.policies:
        kinds = [step.kind for step in policy.steps]
        assert kinds[0] in ("nice", "cpu"), policy.name
        assert kinds[0] != "cpu" or dict(policy.steps[0].params["cpu"]).keys() <= {"idle", "weight"}, policy.name
        assert kinds == sorted(kinds, key=order.get), policy.name
        assert all(step.kind != "nice" or step.params["nice"] > 0 for step in policy.steps)
        assert policy.description


@pytest.mark.parametrize(
    "process, expected",
    [
        (ProcessInfo(1000, 1, "fluent-bit"), "log-shippers"),
        (ProcessInfo(1000, 1, "otelcol-contrib"), "log-shippers"),
        (ProcessInfo(1000, 1, "ruby", cmdline=("/opt/td-agent/bin/ruby", "/usr/sbin/td-agent", "--under-supervisor")), "fluentd"),
        (ProcessInfo(1000, 1, "ruby", cmdline=("/opt/td-agent/bin/ruby", "/srv/app.rb")), None),
        (ProcessInfo(1000, 1, "java", cmdline=("java", "-cp", "x", "org.logstash.Logstash")), "logstash"),
        (ProcessInfo(1000, 1, "agent", exe="/opt/datadog-agent/bin/agent/agent"), "datadog-agent"),
        (ProcessInfo(1000, 1, "trace-agent", exe="/opt/datadog-agent/embedded/bin/trace-agent"), "datadog-agent"),
        (ProcessInfo(1000, 1, "agent", exe="/usr/bin/agent"), None),
        (ProcessInfo(1000, 1, "gzip", ancestors=((900, "logrotate"), (800, "cron"))), "logrotate-compressors"),
        (ProcessInfo(1000, 1, "gzip", ancestors=((900, "bash"),)), None),
        (ProcessInfo(1000, 1, "logrotate"), "logrotate"),
        (ProcessInfo(1000, 1, "updatedb.plocat"), "updatedb"),
        (ProcessInfo(1000, 1, "mandb"), "man-db"),
        (ProcessInfo(1000, 1, "restic"), "restic"),
        (ProcessInfo(1000, 1, "borg"), "borg"),
        (ProcessInfo(1000, 1, "nginx"), None),
    ],
)
def test_shipped_policies_select(process, expected):
    selected = load_policies([ROOT / "policies"]).select(process)
    assert (selected[0].name if selected else None) == expected


# -- placement ----------------------------------------------------------------------------------------

def test_placement_resolution():
    assert unprotected_cpus({0, 1}, {0, 1, 2, 3}) == {2, 3}
    assert unprotected_cpus({0, 1}, {0, 1}) == frozenset()
    assert resolve_cpu_spec(CpuSpec(True), {0}, {0, 1, 2}) == {1, 2}
    assert resolve_cpu_spec(CpuSpec(False, frozenset({1, 5})), {0}, {0, 1, 2}) == {1}
    assert owned_cgroup_name("log-shippers") == "remediator-log-shippers"
    assert owned_cgroup_name("remediator-x") == "remediator-x"


def test_auto_request_cpus_is_the_union_and_skips_vanished_threads():
    masks = {10: {0}, 11: {0, 1}}

    def affinity(tid):
        if tid not in masks:
            raise ProcessLookupError(tid)
        return masks[tid]

    def no_cgroup(pid):
        return None

    online = frozenset(range(4))
    assert auto_request_cpus({1: [10, 11, 12]}, online, no_cgroup, get_affinity=affinity) == {0, 1}
    own = frozenset(os.sched_getaffinity(0))
    assert auto_request_cpus({os.getpid(): [os.getpid()]}, own, no_cgroup) == own


def test_auto_request_cpus_stop_reading_once_every_online_cpu_is_requested():
    read = []

    def affinity(tid):
        read.append(tid)
        return {0, 1} if tid == 11 else {0}

    cgroups_read = []

    def no_cgroup(pid):
        cgroups_read.append(pid)
        return None

    online = frozenset({0, 1})
    tids = list(range(10, 510))  # a 500-thread service, unpinned from its second thread on
    assert auto_request_cpus({1: tids, 2: [600, 601]}, online, no_cgroup, get_affinity=affinity) == online
    assert read == [10, 11]  # nothing read after can narrow the union
    assert cgroups_read == [1]
    # Pinned threads are all read: each may add a CPU.
    read.clear()
    assert auto_request_cpus({1: [10, 12, 13]}, frozenset({0, 1, 2}), no_cgroup, get_affinity=affinity) == {0}
    assert read == [10, 12, 13]


def test_auto_request_cpus_come_from_a_restricting_cgroup_not_from_the_threads():
    masks = {10: {0, 1, 2, 3}, 20: {1}}

    def affinity(tid):
        return masks[tid]

    online = frozenset(range(4))
    cgroups = {1: frozenset({2}), 2: online}
    # Process 1's cgroup allows CPU 2 only: its threads' masks do not widen that. Process 2's
    # cgroup allows every CPU, so its threads' affinities count.
    assert auto_request_cpus({1: [10], 2: [20]}, online, cgroups.get, get_affinity=affinity) == {1, 2}
    assert auto_request_cpus({1: [10]}, online, cgroups.get, get_affinity=affinity) == {2}


@pytest.mark.parametrize("above, expected_us", [("30us", 30.0), ("2ms", 2000.0), ("0.5ms", 500.0), ("1.5s", 1_500_000.0), ("0.1ms", 100.0)])
def test_tail_threshold_in_microseconds_is_exact(above, expected_us):
    text = FULL.replace('above = "2ms"', f'above = "{above}"')
    (policy,), _ = compile_text(text)
    assert policy.trigger.tail_above_us == expected_us


def test_a_duration_with_a_trailing_newline_is_a_located_error_not_a_crash():
    """Regression (found by the property test): "$" in the duration pattern also matches before a
    final newline, so "3s\\n" passed the check and Decimal("3s") then raised InvalidOperation."""
    from remediator.durations import parse_duration

    with pytest.raises(ValueError):
        parse_duration("3s\n")
    policies, diagnostics = compile_text(FULL.replace('settle = "3s"', 'settle = "3s\\n"'))
    assert policies == []
    errors = [d for d in diagnostics if d.severity == "error"]
    assert errors and errors[0].location.line == 12, [str(d) for d in diagnostics]
