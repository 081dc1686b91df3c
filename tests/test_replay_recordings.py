"""Recorded samples replayed through the shipped policies: one test per recording, the reviewed
verdict beside it (tests/fixtures/recordings/*.expected.json). No kernel needed.

Each expectation also states its premise (the scene really hurt the service, or really did not),
so a re-recording that missed the point fails here instead of passing trivially.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remediator.cli import main
from remediator.sample import read_samples

RECORDINGS = Path(__file__).resolve().parent / "fixtures" / "recordings"
POLICIES = Path(__file__).resolve().parent.parent / "policies"
CASES = sorted(path.name.removesuffix(".jsonl") for path in RECORDINGS.glob("*.jsonl"))


def test_there_are_recordings():
    assert {"fluent-bit-bursts", "quiet", "unnamed-batch-job", "xz-own-session"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_recording_replays_to_its_verdict(name, capsys):
    expected = json.loads((RECORDINGS / f"{name}.expected.json").read_text())
    samples = list(read_samples(RECORDINGS / f"{name}.jsonl"))

    premise = expected["premise"]
    hot = [s for s in samples if (s.protected.percentile_ns(99) or 0) > 2e6]
    if "min_windows_over_2ms" in premise:
        assert len(hot) >= premise["min_windows_over_2ms"], "the scene did not hurt the service: re-record it"
        blamed = {s.processes[s.blame[0][0]].comm for s in hot if s.blame and s.blame[0][0] in s.processes}
        assert premise["comm"] in blamed, f"{premise['comm']} was never the most blamed: {blamed}"
    if "max_windows_over_2ms" in premise:
        assert len(hot) <= premise["max_windows_over_2ms"]

    code = main(["replay", str(RECORDINGS / f"{name}.jsonl"), "--policies", str(POLICIES),
                 "--request-cpus", expected["request_cpus"], "--json"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = []
    for record in records:
        entry = {"decision": record["decision"], "policy": record["policy"]["name"], "comm": record["process"]["comm"]}
        if record.get("step"):
            entry["step"] = record["step"]["action"]
        got.append(entry)
    assert got == expected["decisions"], expected["why"]
