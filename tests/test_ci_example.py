"""examples/ci/policy-review.sh, as a policy repository's CI would run it: check, then replay --against."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REMEDIATOR = str(Path(sys.executable).with_name("remediator"))


def run_review(tmp_path: Path, proposed: Path) -> subprocess.CompletedProcess:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    for name in ("fluent-bit-bursts.jsonl", "unnamed-batch-job.jsonl"):
        shutil.copy(HERE / "fixtures" / "recordings" / name, recordings / name)
    return subprocess.run([str(ROOT / "examples" / "ci" / "policy-review.sh"), str(ROOT / "policies"), str(proposed),
                           str(recordings), str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "REMEDIATOR": REMEDIATOR}, timeout=120)


def test_a_suggested_policy_shows_as_new_changes(tmp_path):
    proposed = tmp_path / "proposed"
    shutil.copytree(ROOT / "policies", proposed)
    draft = subprocess.run([REMEDIATOR, "policy", "suggest", "--recording",
                            str(HERE / "fixtures" / "recordings" / "unnamed-batch-job.jsonl"), "--policies",
                            str(ROOT / "policies")], capture_output=True, text=True, check=True).stdout
    (proposed / "suggested.toml").write_text(draft)
    result = run_review(tmp_path, proposed)
    assert result.returncode == 0, result.stderr
    same = json.loads((tmp_path / "out" / "fluent-bit-bursts.jsonl.json").read_text())
    changed = json.loads((tmp_path / "out" / "unnamed-batch-job.jsonl.json").read_text())
    assert same["same"] and same["old_changes"] == 2
    assert not changed["same"] and changed["only_new"] == 2 and changed["changes"][0]["policy"] == "suggested-batch-job"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "1 recording(s) where the proposed policies act differently" in summary


def test_a_broken_policy_fails_the_job(tmp_path):
    proposed = tmp_path / "proposed"
    shutil.copytree(ROOT / "policies", proposed)
    (proposed / "broken.toml").write_text('[[policy]]\nname = "x"\n')
    result = run_review(tmp_path, proposed)
    assert result.returncode == 1
    assert "broken.toml:1" in result.stdout + result.stderr
