"""The daemon config: compiled values, paths relative to the file, errors, and the trust check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remediator.config import load_config
from remediator.trustedfs import Trust, UntrustedPath, read_bytes
from remediator.policy import PolicyErrors
from remediator.selectors import ProtectSelectors

ROOT = Path(__file__).resolve().parent.parent


def test_example_config():
    config = load_config(ROOT / "examples" / "remediator.toml")
    assert config.protect == ProtectSelectors(pids=(), comms=("nginx", "envoy"), cgroups=(), units=("api.service",), users=(0, 33))
    assert config.request_cpus is None  # auto
    assert (config.mode, config.tick_s, config.on_start, config.revert_on_exit) == ("dry-run", 0.25, "restore", True)
    assert config.source == "bpf"
    assert config.policy_paths == (ROOT / "policies",)
    assert config.journal_path == Path("/var/lib/remediator/journal.jsonl")
    assert config.audit_path == Path("/var/log/remediator/audit.jsonl")
    assert config.max_changes_per_minute == 10


def test_defaults_and_relative_paths(tmp_path):
    (tmp_path / "policies").mkdir()
    path = tmp_path / "remediator.toml"
    path.write_text('[protect]\nunit = "api"\ncgroup = ["/sys/fs/cgroup/system.slice/api.service/"]\nrequest_cpus = "0-1, 4"\n'
                    '[daemon]\njournal = "state/journal.jsonl"\n')
    config = load_config(path)
    assert config.protect.units == ("api.service",)
    assert config.protect.cgroups == ("/system.slice/api.service",)
    assert config.request_cpus == frozenset({0, 1, 4})
    assert config.mode == "dry-run" and config.tick_s == 0.25
    assert config.source == "bpf"  # no silent fallback unless the file asks for one
    assert config.policy_paths == (tmp_path / "policies",)
    assert config.journal_path == tmp_path / "state" / "journal.jsonl"
    assert config.max_changes_per_minute == 10


def test_errors_are_located(tmp_path):
    (tmp_path / "policies").mkdir()
    path = tmp_path / "remediator.toml"
    path.write_text('[protect]\ncomm = ["nginx"]\n[daemon]\nmode = "on"\ntick = 1\n')
    with pytest.raises(PolicyErrors) as caught:
        load_config(path)
    assert str(caught.value).splitlines() == [
        f"{path}:4:8: error: daemon.mode: \"on\" is not one of 'live', 'dry-run'",
        f'{path}:5:8: error: daemon.tick: a duration needs a unit: write "1s" (units: us, ms, s, m, h)',
    ]


@pytest.mark.parametrize("source", ["bpf", "auto", "procfs"])
def test_each_source_compiles(tmp_path, source):
    (tmp_path / "policies").mkdir()
    path = tmp_path / "remediator.toml"
    path.write_text(f'[protect]\ncomm = ["nginx"]\n[daemon]\nsource = "{source}"\n')
    config = load_config(path)
    assert config.source == source
    assert config.to_json()["source"] == source


def test_a_bad_source_is_located(tmp_path):
    (tmp_path / "policies").mkdir()
    path = tmp_path / "remediator.toml"
    path.write_text('[protect]\ncomm = ["nginx"]\n[daemon]\nsource = "ebpf"\n')
    with pytest.raises(PolicyErrors) as caught:
        load_config(path)
    assert str(caught.value).splitlines() == [
        f"{path}:4:10: error: daemon.source: \"ebpf\" is not one of 'bpf', 'auto', 'procfs'; did you mean 'bpf'?",
    ]


def test_unreadable_and_syntax_errors(tmp_path):
    with pytest.raises(PolicyErrors, match="missing.toml: error: cannot read: No such file or directory"):
        load_config(tmp_path / "missing.toml")
    path = tmp_path / "remediator.toml"
    path.write_text("[protect\n")
    with pytest.raises(PolicyErrors, match=r"remediator.toml:1:9: error: TOML syntax: "):
        load_config(path)


STRICT = Trust(enforce=True)


# -- trust ------------------------------------------------------------------------------------------

@pytest.fixture
def trusted_dir(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    path = directory / "remediator.toml"
    path.write_text('[protect]\ncomm = ["nginx"]\n[daemon]\npolicies = ["."]\n')
    os.chmod(path, 0o644)
    return directory


@pytest.mark.root
def test_trusted_file_owned_by_root_and_not_writable_by_others(trusted_dir):
    path = trusted_dir / "remediator.toml"
    read_bytes(path, STRICT)  # tmp_path sits under /tmp: world-writable but sticky, crossed to a root-owned directory
    assert load_config(path, STRICT).protect.comms == ("nginx",)

    os.chmod(path, 0o664)
    with pytest.raises(UntrustedPath, match=r"it is group- or world-writable \(mode 0664\)"):
        read_bytes(path, STRICT)
    os.chmod(path, 0o644)

    os.chmod(trusted_dir, 0o777)  # (refused on the way, before it is known to hold the file)
    with pytest.raises(UntrustedPath, match=rf"{trusted_dir} is world-writable \(mode 0777\)"):
        read_bytes(path, STRICT)
    os.chmod(trusted_dir, 0o775)
    with pytest.raises(UntrustedPath, match=rf"{trusted_dir} is group- or world-writable \(mode 0775\)"):
        read_bytes(path, STRICT)
    os.chmod(trusted_dir, 0o755)

    os.chown(path, 65534, 65534)
    with pytest.raises(UntrustedPath, match="is owned by uid 65534, not root"):
        load_config(path, STRICT)


@pytest.mark.root
def test_a_symlink_is_judged_by_its_target(trusted_dir, tmp_path):
    target = trusted_dir / "remediator.toml"
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    read_bytes(link, STRICT)
    os.chown(target, 65534, 65534)
    with pytest.raises(UntrustedPath, match="owned by uid 65534"):
        read_bytes(link, STRICT)
