"""`remediator policy suggest`: drafts for much-blamed processes no policy names, from a recording.

The draft must pass `policy check` as printed, and a replay of the same recording with it must act
on the process it was drafted for; process-controlled strings must not be able to inject TOML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from remediator.cli import main
from remediator.tomlpos import parse

HERE = Path(__file__).resolve().parent
RECORDINGS = HERE / "fixtures" / "recordings"
POLICIES = HERE.parent / "policies"
BATCH_PID = 27691


def suggest(capsys, recording: Path, *extra: str) -> tuple[str, str]:
    assert main(["policy", "suggest", "--recording", str(recording), "--policies", str(POLICIES), *extra]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def rewritten(tmp_path: Path, change) -> Path:
    """The unnamed-batch-job recording with `change(process_json)` applied to every description of the batch job."""
    lines = []
    for line in (RECORDINGS / "unnamed-batch-job.jsonl").read_text().splitlines():
        sample = json.loads(line)
        for pid, info in sample["processes"].items():
            if int(pid) == BATCH_PID:
                change(info)
        for usage in sample["usage"]:
            if usage[0] == BATCH_PID and "comm" in sample["processes"].get(str(BATCH_PID), {}):
                usage[1] = sample["processes"][str(BATCH_PID)]["comm"]
        lines.append(json.dumps(sample))
    path = tmp_path / "recording.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def replayed_actions(capsys, recording: Path, policies: list[Path]) -> list[tuple]:
    args = ["replay", str(recording), "--request-cpus", "0", "--json"]
    for path in policies:
        args += ["--policies", str(path)]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [(r["policy"]["name"], r["process"]["pid"], r["step"]["action"]) for r in records if r["decision"] == "act"]


def test_draft_for_the_unnamed_batch_job_checks_and_acts_in_replay(capsys, tmp_path):
    recording = RECORDINGS / "unnamed-batch-job.jsonl"
    assert replayed_actions(capsys, recording, [POLICIES]) == []  # the premise: nothing names it
    out, _ = suggest(capsys, recording)
    data = parse(out, "draft").data
    (policy,) = data["policy"]
    assert policy["name"] == "suggested-batch-job"
    assert policy["match"] == {"comm": ["batch-job"], "user": ["root"]}  # unique comm; never a pid
    assert "pid" not in out.split("[policy.match]")[1].split("[policy.trigger]")[0]
    assert policy["trigger"]["tail"]["above"] == "2ms"
    assert [list(step)[0] for step in policy["actions"]] == ["cpu_idle", "affinity", "cpuset"]
    assert re.search(r"over 2ms in 9 of 40 windows", out) and "88%" in out  # the evidence, in comments
    draft = tmp_path / "draft.toml"
    draft.write_text(out)
    assert main(["policy", "check", str(draft)]) == 0
    capsys.readouterr()
    actions = replayed_actions(capsys, recording, [POLICIES, draft])
    assert actions and actions[0] == ("suggested-batch-job", BATCH_PID, "cpu_idle")


def test_nothing_to_suggest_when_a_policy_names_the_offender(capsys):
    out, err = suggest(capsys, RECORDINGS / "fluent-bit-bursts.jsonl")
    assert out == ""
    assert "already named by policy log-shippers" in err and "nothing to suggest" in err


@pytest.mark.parametrize("comm", ['x"]\n[[policy]]', "a\\b\"'#*?[", "evil\u2028\x1b[2J"])
def test_a_hostile_comm_cannot_inject_toml(capsys, tmp_path, comm):
    cmdline = [f'/bin/{comm}', '--flag="\n[policy.limits]\nx = 1']

    def hostile(info):
        info["comm"] = comm
        info["cmdline"] = cmdline
    recording = rewritten(tmp_path, hostile)
    out, _ = suggest(capsys, recording)
    data = parse(out, "draft").data
    assert list(data) == ["policy"] and len(data["policy"]) == 1
    (policy,) = data["policy"]
    assert set(policy) == {"name", "description", "match", "trigger", "actions", "limits"}
    assert set(policy["match"]) == {"comm", "user"}
    from remediator.matching import Glob

    assert Glob.compile(policy["match"]["comm"][0]).matches(comm)
    assert all(line.startswith("#") or line.startswith("[") or "=" in line for line in out.splitlines() if line)
    draft = tmp_path / "draft.toml"
    draft.write_text(out)
    assert main(["policy", "check", str(draft)]) == 0


def test_a_shared_comm_and_exe_fall_back_to_the_program_it_runs(capsys, tmp_path):
    def python_job(info):
        info["comm"] = "api-client"  # the protected client's name, and the same interpreter as everyone
        info["cmdline"] = ["/usr/bin/python3", "-u", "/srv/jobs/nightly.py", "--all"]
    recording = rewritten(tmp_path, python_job)
    out, _ = suggest(capsys, recording)
    (policy,) = parse(out, "draft").data["policy"]
    assert "comm" not in policy["match"] and "exe" not in policy["match"]
    pattern = re.compile(policy["match"]["cmdline"])
    assert pattern.search("/usr/bin/python3 -u /srv/jobs/nightly.py --all")
    assert not pattern.search("/usr/bin/python3 /srv/jobs/nightly.py.bak")
    assert not pattern.search("/work/main/.venv/bin/python /work/main/bench/workloads/loadgen.py --port 1")
    draft = tmp_path / "draft.toml"
    draft.write_text(out)
    capsys.readouterr()
    actions = replayed_actions(capsys, recording, [POLICIES, draft])
    assert actions and actions[0][:2] == (policy["name"], BATCH_PID)
