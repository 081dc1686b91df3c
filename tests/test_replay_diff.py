"""`replay --against`: what a policy change would change, side by side, on a recorded incident."""

from __future__ import annotations

import json
from pathlib import Path

from remediator.cli import main

HERE = Path(__file__).resolve().parent
RECORDINGS = HERE / "fixtures" / "recordings"
POLICIES = HERE.parent / "policies"


def slower_shippers(tmp_path: Path) -> Path:
    """The shipped log-shipper policy, made to wait for 4 hot windows out of 4 instead of 2."""
    directory = tmp_path / "proposed"
    directory.mkdir()
    for path in POLICIES.glob("*.toml"):
        text = path.read_text()
        if path.name == "log-shippers.toml":
            text = text.replace('windows = 2, of = 4', 'windows = 4, of = 4')
        (directory / path.name).write_text(text)
    return directory


def replay_json(capsys, *args: str) -> dict:
    assert main(["replay", str(RECORDINGS / "fluent-bit-bursts.jsonl"), "--request-cpus", "0", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_same_policies_make_the_same_changes(capsys):
    diff = replay_json(capsys, "--policies", str(POLICIES), "--against", str(POLICIES), "--format", "json")
    assert diff["same"] and diff["old_changes"] == diff["new_changes"] == 2
    assert [row["in"] for row in diff["changes"]] == ["both", "both"]


def test_a_change_that_stops_acting_is_shown_on_the_old_side_only(capsys, tmp_path):
    diff = replay_json(capsys, "--policies", str(POLICIES), "--diff", str(slower_shippers(tmp_path)), "--format", "json")
    assert not diff["same"]
    assert (diff["old_changes"], diff["new_changes"], diff["only_old"], diff["only_new"]) == (2, 0, 2, 0)
    rows = diff["changes"]
    assert [(r["in"], r["decision"], r["policy"], r["step"], r["comm"]) for r in rows] == [
        ("old", "act", "log-shippers", "cpu_idle", "fluent-bit"),
        ("old", "act", "log-shippers", "affinity unprotected", "fluent-bit")]
    assert rows[0]["epoch"] < rows[1]["epoch"] and rows[0]["pid"] == 27667


def test_text_side_by_side(capsys, tmp_path):
    assert main(["replay", str(RECORDINGS / "fluent-bit-bursts.jsonl"), "--request-cpus", "0", "--policies", str(POLICIES),
                 "--against", str(slower_shippers(tmp_path))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["TIME", "(UTC)", "OLD", "NEW"]
    assert "act log-shippers: cpu_idle fluent-bit (27667)" in out[2] and out[2].rstrip().endswith("<- differs")
    assert out[-1] == "differs: 2 only in old, 0 only in new"


def test_json_without_against_is_still_one_line_per_decision(capsys):
    assert main(["replay", str(RECORDINGS / "fluent-bit-bursts.jsonl"), "--request-cpus", "0", "--policies", str(POLICIES),
                 "--format", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(json.loads(line)["mode"] == "replay" for line in lines)


def test_replay_metrics_are_never_written_through_a_symbolic_link(capsys, tmp_path):
    """As `report -o`: root replaying into a user's directory must not follow a link planted at the name."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "replay.prom").symlink_to(victim)
    assert main(["replay", str(RECORDINGS / "fluent-bit-bursts.jsonl"), "--request-cpus", "0", "--policies", str(POLICIES),
                 "--metrics", str(tmp_path / "replay.prom")]) == 1
    assert victim.read_text() == "keep me"
    assert capsys.readouterr().err.strip() == f"remediator: error: {tmp_path}/replay.prom: is a symbolic link: not written through it"
    assert main(["replay", str(RECORDINGS / "fluent-bit-bursts.jsonl"), "--request-cpus", "0", "--policies", str(POLICIES),
                 "--metrics", str(tmp_path / "fresh.prom")]) == 0
    assert "remediator_ticks_total" in (tmp_path / "fresh.prom").read_text()
