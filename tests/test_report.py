"""`remediator report`, checked by content: the picture is drawn from a test scene (a recorded incident
and the decisions the shipped policies make on it), and the figure must carry exactly that data."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from remediator.cli import main  # noqa: E402
from remediator.commands.record import replay_records  # noqa: E402
from remediator.engine import EngineSettings  # noqa: E402
from remediator.incident import load_scene  # noqa: E402
from remediator.policy import load_policies  # noqa: E402
from remediator.report import build, draw, html_page, png_bytes  # noqa: E402
from remediator.sample import read_samples  # noqa: E402

HERE = Path(__file__).resolve().parent
RECORDING = HERE / "fixtures" / "recordings" / "fluent-bit-bursts.jsonl"
POLICIES = HERE.parent / "policies"
HOSTILE = '<script>alert("x")</script>&\n'


@pytest.fixture
def scene_files(tmp_path):
    """The recording, and an audit log: what the shipped policies decide on it, plus a give-back at
    exit and a decision about a process with a hostile comm and cmdline."""
    samples = list(read_samples(RECORDING))
    settings = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=10,
                              self_pid=-1)
    records = replay_records(samples, load_policies([POLICIES]), settings)
    records.append({"ts": "2026-11-25T02:14:51.000Z", "epoch": samples[-1].ts, "mode": "live", "decision": "exit",
                    "process": {"pid": 27667, "start_time": 1}, "outcome": "restored", "change": "gave it back"})
    records.append({"ts": "2026-11-25T02:14:50.000Z", "epoch": samples[-2].ts, "mode": "live", "decision": "unmatched",
                    "process": {"pid": 4242, "start_time": 2, "comm": HOSTILE, "cmdline": HOSTILE + " --x"},
                    "message": HOSTILE})
    audit = tmp_path / "audit.jsonl"
    audit.write_text("".join(json.dumps(r) + "\n" for r in records))
    return audit, samples, records


def test_the_figure_holds_the_scene(scene_files):
    audit, samples, records = scene_files
    data = build(load_scene(audit, RECORDING))
    figure = draw(data)
    tail_axes, blame_axes = figure.axes
    lines = {line.get_gid(): line for line in tail_axes.get_lines() if line.get_gid()}
    start = samples[0].ts
    expected_p99 = [s.protected.percentile_ns(99) / 1000 for s in samples]
    assert list(lines["p99"].get_ydata()) == pytest.approx(expected_p99)
    assert list(lines["max"].get_ydata()) == pytest.approx([s.protected.max_ns / 1000 for s in samples])
    assert list(lines["p99"].get_xdata()) == pytest.approx([s.ts - start for s in samples])
    # Every action and revert is on the picture, labelled with its policy and step, where it happened.
    texts = [(a.get_gid(), a.get_text()) for a in tail_axes.texts]
    acts = [r for r in records if r["decision"] == "act"]
    assert len(acts) == 2
    for record in acts:
        label = f"log-shippers: {record['step']['action']} (fluent-bit 27667)"
        assert ("act", label) in texts
    assert ("revert", "exit: given back (pid 27667)") in texts
    verdicts = [r["evidence"]["verdict"] for r in records if r["decision"] == "verify"]
    assert [t for gid, t in texts if gid == "verify"] == [f"log-shippers: {v} (fluent-bit 27667)" for v in verdicts]
    vertical = [line.get_xdata()[0] for line in tail_axes.get_lines() if not line.get_gid() and len(set(line.get_xdata())) == 1]
    assert vertical == pytest.approx([r["epoch"] - start for r in acts] + [samples[-1].ts - start])
    # The blame panel: fluent-bit first, with its share of the wait in the hot windows.
    bars = blame_axes.patches
    labels = [t.get_text() for t in blame_axes.get_yticklabels()]
    assert labels[-1] == "fluent-bit (27667)" and data.blamed[0].comm == "fluent-bit"
    assert bars[-1].get_width() == pytest.approx(data.blamed[0].share * 100)
    assert data.blamed[0].share > 0.5

    # The pixels: the picture really has the red action lines and the blue p99 line.
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(png_bytes(figure)), format="png")
    assert pixels.shape[:2] == (750, 1100)
    rgb = (pixels[..., :3] * 255).astype(int)
    red = ((rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)).sum()  # the action lines (alpha-blended)
    blue = ((abs(rgb[..., 0] - 31) < 20) & (abs(rgb[..., 1] - 119) < 20) & (abs(rgb[..., 2] - 180) < 20)).sum()
    assert red > 300 and blue > 300, (red, blue)


def test_the_page_is_self_contained_and_escapes_what_processes_control(scene_files):
    audit, _, _ = scene_files
    data = build(load_scene(audit, RECORDING))
    png = b"\x89PNG fake"
    page = html_page(data, png)
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "<script" not in page and "alert(&quot;x&quot;)" in page
    assert re.findall(r"<tr>", page), "the decisions table is there"
    assert page.count("<td>act</td>") == 2 and "<td>cpu_idle</td>" in page and "<td>affinity unprotected</td>" in page
    assert 'src="http' not in page and "<link" not in page  # nothing fetched from elsewhere


def test_cli_writes_png_and_html_within_a_time_range(scene_files, tmp_path, capsys):
    audit, samples, _ = scene_files
    out = tmp_path / "incident"
    assert main(["report", "--audit", str(audit), "--recording", str(RECORDING), "--since", str(samples[10].ts),
                 "--until", str(samples[30].ts), "-o", str(out)]) == 0
    assert (tmp_path / "incident.png").read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "incident.html").read_text()
    assert "21 windows" in page  # samples 10..30 only
    assert page.count("<td>act</td>") == 1  # the first action (sample 6) is before --since
    assert "wrote" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["report", "--recording", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")]) == 1
    assert main(["report", "--recording", str(RECORDING), "--since", "yesterday", "-o", str(tmp_path / "x")]) == 1
    assert main(["report", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("remediator: error:") for line in err), err


def test_the_output_is_never_written_through_a_symbolic_link(scene_files, tmp_path, capsys):
    """root running `report -o` into a user's directory: a link the user planted at the name must
    not make it overwrite what the link points to; and a directory that is not there is one line."""
    audit, _samples, _ = scene_files
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "incident.png").symlink_to(victim)
    assert main(["report", "--audit", str(audit), "--recording", str(RECORDING), "-o", str(tmp_path / "incident")]) == 1
    assert main(["report", "--audit", str(audit), "--recording", str(RECORDING), "-o", str(tmp_path / "none" / "x")]) == 1
    assert victim.read_text() == "keep me"
    err = capsys.readouterr().err.splitlines()
    assert err == [f"remediator: error: {tmp_path}/incident.png: is a symbolic link: not written through it",
                   f"remediator: error: cannot write {tmp_path}/none/x.png: No such file or directory"], err


def test_a_comm_that_reads_as_mathtext_is_drawn_as_it_is(scene_files):
    """Any process can call itself `$\\foo$`: matplotlib would parse it as mathtext and fail."""
    import dataclasses

    audit, _, _ = scene_files
    data = build(load_scene(audit, RECORDING))
    hostile = dataclasses.replace(data.blamed[0], comm="$\\undefinedmacro{$")
    data = dataclasses.replace(data, blamed=[hostile, *data.blamed[1:]])
    figure = draw(data)
    assert png_bytes(figure).startswith(b"\x89PNG")
    labels = [t.get_text() for t in figure.axes[1].get_yticklabels()]
    assert labels[-1] == "\\$\\undefinedmacro{\\$ (27667)"
