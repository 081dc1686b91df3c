"""The daemon's bounded rolling recording: the [recording] config table, the cut-over to PATH.1 that
keeps both files under max_bytes, and reading the two halves back in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remediator.config import load_config
from remediator.policy import PolicyErrors
from remediator.recording import RollingRecording, recording_files, rotated_path
from remediator.sample import read_samples
from remediator.trustedfs import Trust, UntrustedPath

RECORDINGS = Path(__file__).resolve().parent / "fixtures" / "recordings"


def samples():
    return list(read_samples(RECORDINGS / "fluent-bit-bursts.jsonl"))


def test_rolls_over_at_half_and_keeps_the_newest_samples(tmp_path):
    source = samples()
    line = max(len(s.to_json().__repr__()) for s in source)  # a rough size, only to pick a small bound
    max_bytes = 65536
    assert line * 4 < max_bytes // 2, "the fixture's samples are too large for this test's bound"
    path = tmp_path / "rec" / "recording.jsonl"
    recording = RollingRecording(path, max_bytes, Trust.relaxed())
    written = []
    for round_ in range(12):  # the same 40 samples again and again, shifted in time so each is distinct
        for sample in source:
            shifted = type(sample)(**{**sample.__dict__, "ts": sample.ts + round_ * 100, "start_ns": sample.start_ns + round_,
                                      "end_ns": sample.end_ns + round_})
            assert recording.write(shifted)
            written.append(shifted)
            assert os.path.getsize(path) <= max_bytes // 2
            if rotated_path(path).exists():
                assert os.path.getsize(rotated_path(path)) <= max_bytes // 2
    recording.close()
    assert rotated_path(path).exists(), "12 x 40 samples should have filled half the bound"
    back = [s for file in recording_files(path) for s in read_samples(file)]
    assert recording_files(path) == [rotated_path(path), path]
    assert back == written[-len(back):]  # the newest samples, in order, none missing in between
    assert len(back) < len(written)


def test_a_sample_larger_than_half_is_dropped_and_counted(tmp_path):
    recording = RollingRecording(tmp_path / "r.jsonl", 65536, Trust.relaxed())
    big = samples()[0]
    huge = type(big)(**{**big.__dict__, "limitations": ("x" * 40000,)})
    assert not recording.write(huge)
    assert recording.dropped == 1
    assert recording.write(big)
    recording.close()
    assert list(read_samples(tmp_path / "r.jsonl")) == [big]


def test_refuses_a_symlink_like_the_audit_log(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "r.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UntrustedPath):
        RollingRecording(tmp_path / "r.jsonl", 65536, Trust.relaxed())


def write_config(tmp_path: Path, recording: str) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    path = tmp_path / "remediator.toml"
    path.write_text('[protect]\npids = [1]\n' + recording)
    return path


def test_config_recording_table(tmp_path):
    assert load_config(write_config(tmp_path, "")).recording_path is None  # off unless asked for
    config = load_config(write_config(tmp_path, '[recording]\npath = "state/recording.jsonl"\n'))
    assert config.recording_path == tmp_path / "state" / "recording.jsonl"
    assert config.recording_max_bytes == 268435456
    config = load_config(write_config(tmp_path, '[recording]\npath = "/r.jsonl"\nmax_bytes = 1048576\n'))
    assert (config.recording_path, config.recording_max_bytes) == (Path("/r.jsonl"), 1048576)


@pytest.mark.parametrize("text, line, message", [
    ('[recording]\npath = "r.jsonl"\nmax_bytes = 100\n', 5, "recording.max_bytes"),
    ('[recording]\nmax_bytes = 1048576\n', 3, "'path'"),
    ('[recording]\npath = "r.jsonl"\nmaxbytes = 1048576\n', 5, "recording.maxbytes: unknown key"),
])
def test_config_recording_errors_name_file_line_and_key(tmp_path, text, line, message):
    path = write_config(tmp_path, text)
    with pytest.raises(PolicyErrors) as caught:
        load_config(path)
    shown = str(caught.value)
    assert f"{path}:{line}:" in shown and message in shown, shown


def test_the_daemon_records_every_tick(tmp_path):
    """`run --record FILE` (here on procfs, dry-run: no root or BPF needed) writes one sample per tick."""
    import subprocess
    import sys

    (tmp_path / "policies").mkdir()
    config = tmp_path / "remediator.toml"
    config.write_text(f'[protect]\npids = [{os.getpid()}]\nrequest_cpus = "0"\n[daemon]\nmode = "dry-run"\n'
                      f'source = "procfs"\ntick = "50ms"\njournal = "{tmp_path}/journal.jsonl"\n'
                      f'audit_log = "{tmp_path}/audit.jsonl"\n[recording]\npath = "from-config.jsonl"\n')
    remediator = str(Path(sys.executable).with_name("remediator"))
    result = subprocess.run([remediator, "run", "--config", str(config), "--ticks", "6", "--record",
                             str(tmp_path / "cli.jsonl")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    recorded = list(read_samples(tmp_path / "cli.jsonl"))
    assert len(recorded) == 6 and all(s.source == "procfs" for s in recorded)
    assert [s.start_ns for s in recorded[1:]] == [s.end_ns for s in recorded[:-1]]  # every tick, none missed
    assert not (tmp_path / "from-config.jsonl").exists()  # --record overrides the config's path
    result = subprocess.run([remediator, "run", "--config", str(config), "--ticks", "3"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(list(read_samples(tmp_path / "from-config.jsonl"))) == 3
