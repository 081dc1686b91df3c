"""Matching (every field, comm truncation, AND/OR) against ProcessInfo values, and precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from remediator.matching import Match, check_comm_glob, check_exe_glob, check_unit_glob
from remediator.policy import PolicyErrors, load_policies
from remediator.procfs import ProcessInfo


def info(comm: str = "proc", **fields) -> ProcessInfo:
    return ProcessInfo(pid=fields.pop("pid", 4242), start_time=100, comm=comm, **fields)


# -- fields ---------------------------------------------------------------------------------------

def test_comm_globs_on_the_truncated_name():
    # The kernel shows "fluent-bit-forwarder" as "fluent-bit-forw".
    truncated = info("fluent-bit-forw")
    assert Match.build(comm=("fluent-bit-forw",)).matches(truncated) is not None
    assert Match.build(comm=("fluent-bit*",)).matches(truncated) is not None
    assert Match.build(comm=("fluent-bit-forw*",)).matches(truncated) is not None  # 15 literal + '*': fine
    assert Match.build(comm=("fluent-bit",)).matches(truncated) is None  # globs match the whole name
    result = Match.build(comm=("td-agent", "fluent-bit*")).matches(truncated)
    assert result.fields == ("comm",) and result.detail == "comm fluent-bit-forw matches 'fluent-bit*'"


def test_comm_globs_that_can_never_match_are_rejected_with_the_cut_name():
    with pytest.raises(ValueError, match=r"write 'fluent-bit-forw'"):
        check_comm_glob("fluent-bit-forwarder")
    with pytest.raises(ValueError, match="needs at least 16 characters"):
        check_comm_glob("fluent-bit-forwa*")
    with pytest.raises(ValueError, match="never closed"):
        check_comm_glob("td-agent[12")
    assert check_comm_glob("[a-z]" * 15) == "[a-z]" * 15  # a class is one character
    assert check_comm_glob("*" * 40) == "*" * 40


def test_exe_globs_and_paths():
    fluent = info("fluent-bit", exe="/opt/fluent-bit/bin/fluent-bit")
    assert Match.build(exe=("/opt/*/bin/fluent-bit",)).matches(fluent).detail == (
        "exe /opt/fluent-bit/bin/fluent-bit matches '/opt/*/bin/fluent-bit'"
    )
    assert Match.build(exe=("*/fluent-bit",)).matches(fluent) is not None
    assert Match.build(exe=("/usr/bin/fluent-bit",)).matches(fluent) is None
    # Kernel threads and unreadable processes have no exe: an exe glob never matches them, even '*'.
    assert Match.build(exe=("*",)).matches(info("kworker/0:1", exe="")) is None
    with pytest.raises(ValueError, match="not an absolute path"):
        check_exe_glob("fluent-bit")


def test_cmdline_regex_is_searched_in_the_joined_arguments():
    logstash = info("java", cmdline=("/usr/bin/java", "-Xmx1g", "org.logstash.Logstash", "-f", "/etc/logstash"))
    result = Match.build(cmdline=r"org\.logstash\.Logstash -f").matches(logstash)
    assert result is not None and result.fields == ("cmdline",)
    assert Match.build(cmdline=r"^org").matches(logstash) is None  # searched, so anchors mean the joined string
    td_agent = info("ruby", cmdline=("/opt/td-agent/bin/ruby", "/usr/sbin/td-agent", "--under-supervisor"))
    fluentd = r"(^|/)(fluentd|td-agent)( |$)"
    assert Match.build(cmdline=fluentd).matches(td_agent) is not None
    assert Match.build(cmdline=fluentd).matches(info("ruby", cmdline=("/opt/td-agent/bin/ruby", "app.rb"))) is None
    assert Match.build(cmdline="x").matches(info("kthread", cmdline=())) is None


def test_cgroup_globs_match_the_cgroup_or_a_parent():
    process = info("fluent-bit", cgroup="/system.slice/fluent-bit.service/worker")
    result = Match.build(cgroup=("/system.slice/fluent-bit.service",)).matches(process)
    assert result.detail == (
        "cgroup /system.slice/fluent-bit.service/worker (under /system.slice/fluent-bit.service) "
        "matches '/system.slice/fluent-bit.service'"
    )
    assert Match.build(cgroup=("/system.slice/*.service",)).matches(process) is not None
    assert Match.build(cgroup=("/user.slice",)).matches(process) is None


def test_unit_names_default_to_service_and_match_any_unit_in_the_path():
    assert check_unit_glob("fluent-bit") == "fluent-bit.service"
    assert check_unit_glob("td-agent*") == "td-agent*"
    process = info("gzip", cgroup="/system.slice/logrotate.service", unit="logrotate.service")
    assert Match.build(unit=("logrotate.service",)).matches(process).detail == "unit logrotate.service matches 'logrotate.service'"
    assert Match.build(unit=("system.slice",)).matches(process) is not None
    assert Match.build(unit=("cron.service",)).matches(process) is None


def test_user_by_name_or_numeric_uid():
    process = info("td-agent", uid=998, user="td-agent")
    assert Match.build(user=("td-agent",)).matches(process) is not None
    assert Match.build(user=("998",)).matches(process).detail == "user td-agent matches '998'"
    assert Match.build(user=("root",)).matches(process) is None


def test_ancestor_matches_any_ancestor_parent_first():
    gzip = info("gzip", ppid=300, ancestors=((300, "sh"), (200, "logrotate"), (100, "cron")))
    result = Match.build(ancestor=("logrotate",)).matches(gzip)
    assert result.detail == "ancestor logrotate (pid 200) matches 'logrotate'"
    assert Match.build(ancestor=("sh", "cron")).matches(gzip).detail == "ancestor sh (pid 300) matches 'sh'"
    assert Match.build(ancestor=("systemd",)).matches(gzip) is None


def test_every_given_field_must_match():
    match = Match.build(comm=("gzip",), ancestor=("logrotate",))
    assert match.specificity == 2
    under_logrotate = info("gzip", ancestors=((200, "logrotate"),))
    result = match.matches(under_logrotate)
    assert result.fields == ("comm", "ancestor")
    assert result.detail == "comm gzip matches 'gzip'; ancestor logrotate (pid 200) matches 'logrotate'"
    assert match.matches(info("gzip", ancestors=((200, "bash"),))) is None
    assert match.matches(info("xz", ancestors=((200, "logrotate"),))) is None
    assert Match().matches(info("anything")) is None  # an empty match never matches (and is rejected by check)


# -- precedence ---------------------------------------------------------------------------------------

def write_policy(directory: Path, file_name: str, name: str, match: str, priority: int = 0, nice: int = 10) -> None:
    path = directory / file_name
    previous = path.read_text() if path.exists() else ""
    path.write_text(
        previous
        + f'[[policy]]\nname = "{name}"\ndescription = "d"\npriority = {priority}\n{match}\n'
        + f"trigger.always = true\n[[policy.actions]]\nnice = {nice}\n\n"
    )


def test_higher_priority_wins(tmp_path):
    write_policy(tmp_path, "a.toml", "specific", 'match.comm = ["gzip"]\nmatch.ancestor = ["logrotate"]')
    write_policy(tmp_path, "b.toml", "urgent", 'match.comm = ["gz*"]', priority=5, nice=19)
    policies = load_policies([tmp_path])
    gzip = info("gzip", ancestors=((200, "logrotate"),))
    policy, result = policies.select(gzip)
    assert policy.name == "urgent" and result.fields == ("comm",)
    assert [p.name for p, _ in policies.matching(gzip)] == ["urgent", "specific"]


def test_more_specific_wins_at_equal_priority(tmp_path):
    write_policy(tmp_path, "a.toml", "any-gzip", 'match.comm = ["gzip"]', nice=5)
    write_policy(tmp_path, "b.toml", "logrotate-gzip", 'match.comm = ["gzip"]\nmatch.ancestor = ["logrotate"]')
    policies = load_policies([tmp_path])
    assert policies.select(info("gzip", ancestors=((200, "logrotate"),)))[0].name == "logrotate-gzip"
    assert policies.select(info("gzip"))[0].name == "any-gzip"
    assert policies.select(info("bash")) is None


def test_file_order_then_position_breaks_the_last_tie(tmp_path):
    # Same priority and specificity, different selector values: no conflict, the earlier file wins.
    write_policy(tmp_path, "b.toml", "in-b", 'match.comm = ["gz*"]')
    write_policy(tmp_path, "a.toml", "in-a-first", 'match.comm = ["g*"]')
    write_policy(tmp_path, "a.toml", "in-a-second", 'match.comm = ["*zip"]')
    policies = load_policies([tmp_path])
    assert [p.name for p in policies.policies] == ["in-a-first", "in-a-second", "in-b"]
    assert [p.name for p, _ in policies.matching(info("gzip"))] == ["in-a-first", "in-a-second", "in-b"]


def test_same_selector_same_ladder_is_not_a_conflict_but_a_different_ladder_is(tmp_path):
    write_policy(tmp_path, "a.toml", "one", 'match.comm = ["gzip", "xz"]')
    write_policy(tmp_path, "b.toml", "two", 'match.comm = ["gzip"]')
    assert len(load_policies([tmp_path]).policies) == 2
    write_policy(tmp_path, "c.toml", "three", 'match.comm = ["xz"]', nice=19)
    with pytest.raises(PolicyErrors) as caught:
        load_policies([tmp_path])
    assert [d.code for d in caught.value.diagnostics] == ["conflict"]
    assert "comm 'xz' is also selected by policy 'one'" in str(caught.value)
    # A higher priority settles it.
    (tmp_path / "c.toml").unlink()
    write_policy(tmp_path, "c.toml", "three", 'match.comm = ["xz"]', priority=1, nice=19)
    assert load_policies([tmp_path]).select(info("xz"))[0].name == "three"
