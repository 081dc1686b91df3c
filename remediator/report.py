"""`remediator report`: an incident as a picture and a page.

From a Scene (incident.py): the protected tail over time (p99 and max of each window), every action
and revert drawn where it happened and labelled with its policy and step, the verification
verdicts, and the processes the protected threads waited behind. Written as a PNG (matplotlib,
Agg: no display needed) and as one self-contained HTML file (the PNG inline, and the table of
decisions). Every string a process controls (comm, cmdline) is escaped on the page.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path

from .audit import decision_detail
from .errors import RemediatorError
from .incident import Blamed, Scene
from .printable import printable
from .trustedfs import open_output

DEFAULT_THRESHOLD_US = 2000.0  # the shipped policies' tail threshold, when the audit names none
MARKED = ("act", "revert")  # decisions drawn as vertical lines
GIVE_BACKS = ("exit", "mode-change", "start-up")  # the daemon's own restores (daemon._log_outcome)
ACTION_COLOURS = {"act": "tab:red", "revert": "tab:green"}
VERDICT_COLOURS = {"helped": "tab:green", "did-not-help": "tab:red", "inconclusive": "tab:gray", "unknown": "tab:gray"}


def drawn(text: str) -> str:
    """Process-controlled text as matplotlib draws it literally: escaped (printable), and with `$`
    escaped, or a comm like `$\\foo$` would be parsed as mathtext and stop the picture."""
    return printable(text).replace("$", r"\$")


@dataclass(frozen=True)
class Mark:
    epoch: float
    kind: str  # "act" | "revert" | "verify"
    label: str  # "log-shippers: cpu_idle (fluent-bit 1234)"
    outcome: str
    verdict: str = ""  # verify: helped / did-not-help / inconclusive (unknown in older audits)


@dataclass(frozen=True)
class ReportData:
    times: list[float]  # epoch at the end of each window
    p99_us: list[float | None]
    max_us: list[float | None]
    threshold_us: float
    marks: list[Mark]
    blamed: list[Blamed]
    records: list[dict]
    sources: list[str]


def build(scene: Scene, top: int = 5) -> ReportData:
    if not scene.samples and not scene.records:
        raise RemediatorError("nothing to report in that time range: no samples and no audit lines")
    threshold = scene.threshold_us() or DEFAULT_THRESHOLD_US
    times, p99, peak = [], [], []
    for sample in scene.samples:
        times.append(sample.ts)
        value = sample.protected.percentile_ns(99)
        p99.append(None if value is None else value / 1000.0)
        peak.append(None if sample.protected.max_ns is None else sample.protected.max_ns / 1000.0)
    marks = []
    for record in scene.records:
        kind = record.get("decision")
        process = record.get("process") or {}
        if kind in GIVE_BACKS and record.get("outcome") == "restored":
            # The daemon gave a change back on its own (at exit, on a mode change): a revert too.
            marks.append(Mark(float(record.get("epoch") or 0), "revert",
                              printable(f"{kind}: given back (pid {process.get('pid', '?')})"), "restored"))
            continue
        if kind not in MARKED and kind != "verify":
            continue
        policy = (record.get("policy") or {}).get("name", "?")
        who = f"{process.get('comm', '?')} {process.get('pid', '?')}"
        if kind == "verify":
            what = (record.get("evidence") or {}).get("verdict", "?")
        elif kind == "revert":
            what = "revert"
        else:
            what = (record.get("step") or {}).get("action", "?")
        marks.append(Mark(float(record.get("epoch") or 0), kind, printable(f"{policy}: {what} ({who})"),
                          str(record.get("outcome", "")), what if kind == "verify" else ""))
    return ReportData(times, p99, peak, threshold, marks, scene.top_blamed(threshold, top), scene.records, scene.sources)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RemediatorError("the report needs matplotlib: sudo apt-get install python3-matplotlib (sudo ./bootstrap demo and test install it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(data: ReportData):
    """The figure: the tail over time with the decisions on it (top), the blame ranking (bottom)."""
    plt = _pyplot()
    figure, (tail_axes, blame_axes) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [3, 1.4]})
    start = min(data.times + [m.epoch for m in data.marks])

    def seconds(epoch: float) -> float:
        return epoch - start

    xs = [seconds(t) for t in data.times]
    tail_axes.plot(xs, [float("nan") if v is None else v for v in data.max_us], color="tab:gray", linewidth=0.8,
                   alpha=0.7, label="max per window", gid="max")
    tail_axes.plot(xs, [float("nan") if v is None else v for v in data.p99_us], color="tab:blue", linewidth=1.6,
                   label="p99 per window", gid="p99")
    tail_axes.axhline(data.threshold_us, color="black", linestyle=":", linewidth=1,
                      label=f"threshold {data.threshold_us / 1000:g} ms")
    if any(v for v in data.max_us + data.p99_us):
        tail_axes.set_yscale("log")
    top = tail_axes.get_ylim()[1]
    for index, mark in enumerate(data.marks):
        x = seconds(mark.epoch)
        if mark.kind in MARKED:
            tail_axes.axvline(x, color=ACTION_COLOURS[mark.kind], linewidth=1.2, alpha=0.8)
            tail_axes.annotate(drawn(mark.label), (x, top), xytext=(3, -12 - 11 * (index % 4)), textcoords="offset points",
                               fontsize=7, color=ACTION_COLOURS[mark.kind], va="top", gid=mark.kind)
        else:
            colour = VERDICT_COLOURS.get(mark.verdict, "tab:purple")
            tail_axes.annotate(drawn(mark.label), (x, data.threshold_us), xytext=(3, 10 + 11 * (index % 3)),
                               textcoords="offset points", fontsize=7, color=colour, gid="verify",
                               arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6})
    tail_axes.set_ylabel("protected run-queue wait (µs)")
    tail_axes.set_xlabel(f"seconds since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(start))} UTC")
    tail_axes.set_title("The protected service's run-queue tail, and what remediator did")
    tail_axes.legend(loc="upper right", fontsize=8)
    tail_axes.grid(True, which="major", alpha=0.3)

    names = [drawn(f"{b.comm} ({b.pid})") for b in data.blamed][::-1]
    shares = [b.share * 100 for b in data.blamed][::-1]
    bars = blame_axes.barh(names, shares, color="tab:orange", gid="blame")
    blame_axes.bar_label(bars, fmt="%.0f%%", fontsize=8, padding=2)
    blame_axes.set_xlabel("share of the protected threads' wait spent behind it, in the hot windows (%)")
    blame_axes.set_title("Most blamed processes", fontsize=10)
    if not names:
        blame_axes.text(0.5, 0.5, "no blame recorded", ha="center", va="center", transform=blame_axes.transAxes)
    figure.tight_layout()
    return figure


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _count(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"


def html_page(data: ReportData, png: bytes) -> str:
    """One file: the picture inline and the decisions, every value escaped."""
    esc = html.escape
    rows = []
    for record in data.records:
        policy = record.get("policy") or {}
        process = record.get("process") or {}
        step = record.get("step") or {}
        cells = (str(record.get("ts", "")), record.get("decision", ""), policy.get("name", ""), step.get("action", ""),
                 process.get("pid", ""), process.get("comm", ""), process.get("cmdline", ""), record.get("outcome", ""),
                 decision_detail(record))
        rows.append("<tr>" + "".join(f"<td>{esc(str(cell))}</td>" for cell in cells) + "</tr>")
    blame_rows = "".join(
        f"<tr><td>{b.pid}</td><td>{esc(b.comm)}</td><td>{esc(' '.join(b.info.cmdline) if b.info else '')}</td>"
        f"<td>{b.share:.0%}</td><td>{b.windows}</td><td>{b.seen}</td></tr>" for b in data.blamed)
    hot = sum(1 for v in data.p99_us if v is not None and v > data.threshold_us)
    header = ("<tr><th>time (UTC)</th><th>decision</th><th>policy</th><th>step</th><th>pid</th><th>comm</th>"
              "<th>cmdline</th><th>outcome</th><th>detail</th></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>remediator report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}} img{{max-width:100%}}</style>
</head><body>
<h1>remediator report</h1>
<p>{len(data.times)} windows, {hot} with the protected p99 over {data.threshold_us / 1000:g} ms;
{_count(sum(1 for m in data.marks if m.kind == 'act'), 'action')}, {_count(sum(1 for m in data.marks if m.kind == 'revert'), 'revert')}.
Read from: {esc(', '.join(data.sources))}.</p>
<img alt="the protected tail over time, with every action and revert" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Most blamed processes</h2>
<table><tr><th>pid</th><th>comm</th><th>cmdline</th><th>share of wait</th><th>windows most blamed</th><th>windows seen</th></tr>
{blame_rows}</table>
<h2>Decisions</h2>
<table>{header}
{''.join(rows)}</table>
</body></html>
"""


def write_report(data: ReportData, output: str | Path) -> tuple[Path, Path]:
    """OUTPUT.png and OUTPUT.html (OUTPUT's own suffix, if .png or .html, is dropped)."""
    output = Path(output)
    base = output.with_suffix("") if output.suffix in (".png", ".html") else output
    figure = draw(data)
    try:
        png = png_bytes(figure)
    finally:
        _pyplot().close(figure)
    png_path, html_path = base.with_name(base.name + ".png"), base.with_name(base.name + ".html")
    with open_output(png_path, "wb") as handle:
        handle.write(png)
    with open_output(html_path, "w") as handle:
        handle.write(html_page(data, png))
    return png_path, html_path
