"""`remediator policy check` as a command: exit status, text and JSON output, defaults, and no
traceback on any input (in a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from remediator.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = '[[policy]]\nname = "a"\ndescription = "d"\nmatch.comm = "gzip"\ntrigger.always = true\n[[policy.actions]]\nnice = 10\n'


def test_check_valid_files_exits_0(tmp_path, capsys):
    (tmp_path / "a.toml").write_text(GOOD)
    assert main(["policy", "check", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "0 errors, 0 warnings\n"


def test_check_reports_every_problem_and_exits_1(tmp_path, capsys):
    (tmp_path / "a.toml").write_text(GOOD.replace("nice = 10", "nice = 20\nsettle = 5").replace('"gzip"', '"gzip-compressor-xyz"'))
    assert main(["policy", "check", str(tmp_path / "a.toml"), "--online-cpus", "0-1"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{tmp_path}/a.toml:4:14: error: policy[0].match.comm: comm 'gzip-compressor-xyz' is 19 characters and can never "
        "match: the kernel cuts comm to 15 characters, so write 'gzip-compressor' (or match on exe or cmdline)",
        f"{tmp_path}/a.toml:7:8: error: policy[0].actions[0].nice: 20 is out of range (-20..19)",
        f'{tmp_path}/a.toml:8:10: error: policy[0].actions[0].settle: a duration needs a unit: write "5s" (units: us, ms, s, m, h)',
    ]
    assert captured.err == "3 errors, 0 warnings\n"


def test_a_name_ending_like_another_users_group_is_an_error_at_its_line(tmp_path, capsys):
    """'.uidN' ends the groups of ours that hold other users' offenders: a policy (or a cpuset
    `cgroup`) named so would share uid N's group."""
    (tmp_path / "a.toml").write_text(GOOD.replace('name = "a"', 'name = "a.uid1000"').replace(
        "nice = 10", '[policy.actions.cpuset]\ncpus = "1"\ncgroup = "b.uid0"'))
    assert main(["policy", "check", str(tmp_path / "a.toml"), "--online-cpus", "0-1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": error: ")[0] for line in out] == [f"{tmp_path}/a.toml:2:8", f"{tmp_path}/a.toml:9:10"], out
    assert "policy[0].name: 'a.uid1000' ends like a per-user group of remediator's" in out[0]
    assert "policy[0].actions[0].cpuset.cgroup: 'b.uid0' ends like" in out[1]


def test_check_json_for_ci(tmp_path, capsys):
    (tmp_path / "a.toml").write_text(GOOD.replace('nice = 10', 'affinity = "0-7"'))
    assert main(["policy", "check", "--format", "json", "--online-cpus", "0-3", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "ok": True,
        "errors": 0,
        "warnings": 1,
        "diagnostics": [
            {
                "path": f"{tmp_path}/a.toml",
                "line": 7,
                "column": 12,
                "severity": "warning",
                "code": "host-cpu",
                "key": "policy[0].actions[0].affinity",
                "message": "policy[0].actions[0].affinity: CPUs 4-7 are not online on this host (online: 0-3)",
            }
        ],
    }


def test_check_defaults_to_policies_and_config_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "check"]) == 1
    assert "nothing to check" in capsys.readouterr().err
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "a.toml").write_text(GOOD)
    (tmp_path / "policies" / "b.toml").write_text(GOOD)  # the same name again
    assert main(["policy", "check"]) == 1
    assert capsys.readouterr().out == (
        "policies/b.toml:2:8: error: policy[0].name: policy name 'a' is already used at policies/a.toml:2:8; "
        "names must be unique across files\n"
    )


def test_checking_a_config_checks_its_policies_once(tmp_path, capsys):
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    broken = tmp_path / "policies" / "backup.toml"
    broken.write_text(broken.read_text().replace('comm = ["restic"]', 'comm = ["restic"]\ncomms = ["x"]'))
    config = tmp_path / "examples" / "remediator.toml"
    # Given the config alone, its policies are checked; given both, each file once (no duplicate names).
    for argv in ([str(config)], [str(config), str(tmp_path / "policies")]):
        assert main(["policy", "check", *argv]) == 1
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 1 and out[0].endswith("error: policy[0].match.comms: unknown key; did you mean 'comm'?"), out


def test_policy_without_subcommand_prints_usage(capsys):
    assert main(["policy"]) == 2
    assert "check" in capsys.readouterr().err


def test_no_traceback_on_hostile_files(tmp_path):
    inputs = {
        "binary.toml": bytes(range(256)) * 4,
        "deep.toml": b"a = " + b"[" * 5000,
        "nul.toml": b'[[policy]]\nname = "a\x00b"\n',
        "huge-int.toml": b"[[policy]]\npriority = 99999999999999999999999999999\n",
        "dir.toml": None,
    }
    for name, content in inputs.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "remediator", "policy", "check", str(tmp_path), str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"{tmp_path}/missing.toml: error: no such file or directory") for line in lines)
    assert f"{tmp_path}/binary.toml:2:118: error: not UTF-8: byte 0x80 cannot start or continue a character" in lines
    assert f"{tmp_path}/deep.toml:1:5004: error: TOML syntax: inline arrays/tables are nested too deeply (a few hundred levels at most)" in lines
    assert f"{tmp_path}/nul.toml:2:10: error: TOML syntax: illegal character '\\x00'" in lines
    assert (
        f"{tmp_path}/huge-int.toml:1:1: error: policy[0]: missing required keys 'name', 'description', 'match', 'trigger', 'actions'"
        in lines
    )
    assert f"{tmp_path}/huge-int.toml:2:12: error: policy[0].priority: 99999999999999999999999999999 is out of range (-1000..1000)" in lines
    assert all(": error: " in line or ": warning: " in line for line in lines)


def test_a_policy_name_longer_than_200_characters_is_an_error(tmp_path, capsys):
    """The name goes into cgroup and scope names (with '.uidN' and '.scope'), which systemd caps at 255."""
    (tmp_path / "a.toml").write_text(GOOD.replace('name = "a"', f'name = "{"a" * 201}"'))
    assert main(["policy", "check", str(tmp_path / "a.toml"), "--online-cpus", "0-1"]) == 1
    assert "200 characters at most" in capsys.readouterr().out
    (tmp_path / "a.toml").write_text(GOOD.replace('name = "a"', f'name = "{"a" * 200}"'))
    assert main(["policy", "check", str(tmp_path / "a.toml"), "--online-cpus", "0-1"]) == 0
