"""What `watch` shows for one interval: a JSON-ready dict, and the terminal rendering of it.

The JSON keys are documented in the README ("watch --json"); the text view is drawn from the same
dict, so both always say the same thing.
"""

from __future__ import annotations

import time
from typing import Any

from . import histogram
from .printable import printable
from .sample import Sample


def _us(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1000.0, 1)


def interval_view(sample: Sample, top: int = 5) -> dict[str, Any]:
    waits = sample.protected
    counts = waits.counts()
    has_tail = waits.histogram is not None
    duration = sample.duration_ns

    def comm_of(pid: int) -> str:
        info = sample.processes.get(pid)
        if info is not None:
            return info.comm
        entry = sample.usage_of(pid)
        return entry.comm if entry else "?"

    top_cpu = []
    for entry in sample.usage[:top]:
        peak = sample.peak_cpus(entry)
        top_cpu.append(
            {
                "pid": entry.pid,
                "comm": entry.comm,
                "cpu": round(entry.cpu_ns / duration, 3),
                "peak_cpu": None if peak is None else round(peak, 3),
                "protected": entry.protected,
            }
        )
    top_blame = [
        {
            "pid": pid,
            "comm": comm_of(pid),
            "blame_us": round(ns / 1000.0, 1),
            "share": round(ns / waits.wait_ns, 3) if waits.wait_ns else 0.0,
            "protected": pid in waits.pids,
        }
        for pid, ns in sample.blame[:top]
    ]
    return {
        "ts": round(sample.ts, 3),
        "interval_s": round(duration / 1e9, 3),
        "source": sample.source,
        "protected": {
            "pids": list(waits.pids),
            "threads": waits.threads,
            "waits": waits.waits,
            # procfs counts timeslices, not why each wait began
            "wakeups": waits.wakeups if has_tail else None,
            "preemptions": waits.preemptions if has_tail else None,
            "wait_us_total": round(waits.wait_ns / 1000.0, 1),
            "p50_us": _us(histogram.percentile(counts, 50)) if has_tail else None,
            "p99_us": _us(histogram.percentile(counts, 99)) if has_tail else None,
            "p999_us": _us(histogram.percentile(counts, 99.9)) if has_tail else None,
            "max_us": _us(waits.max_ns),
            # Where the wait went (eBPF only): behind the protected processes' own threads, behind
            # others (the blame), or behind nobody known (an idle CPU, runs the probe no longer held).
            "behind_own_us": _us(waits.own_ns) if has_tail else None,
            "behind_others_us": _us(waits.blamed_ns) if has_tail else None,
            "unattributed_us": _us(waits.unattributed_ns) if has_tail else None,
            "histogram": [
                [round(low / 1000.0, 3), round(high / 1000.0, 3), count]
                for slot, count in sorted(counts.items())
                for low, high in [histogram.slot_bounds(slot)]
            ]
            if has_tail
            else None,
        },
        "top_cpu": top_cpu,
        "top_blame": top_blame,
        "cpu_busy": [round(ns / duration, 3) for ns in sample.cpu_busy_ns],
        "psi_some_us": sample.psi_some_us,
        "lost": dict(sample.lost),
        "limitations": list(sample.limitations),
    }


def _fmt_us(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 10_000:
        return f"{value / 1000:.1f} ms"
    return f"{value:.0f} µs" if value >= 10 else f"{value:.1f} µs"


def _bar(count: int, largest: int, width: int = 40) -> str:
    filled = 0 if largest == 0 else round(count * width / largest)
    return "*" * filled + " " * (width - filled)


def render_text(view: dict[str, Any], sample: Sample, header: str = "") -> str:
    """The terminal view. comm and the rest are process-controlled: escaped (printable.py), so a
    process cannot break the table or send escape sequences to the terminal."""
    waits = view["protected"]
    stamp = time.strftime("%H:%M:%S", time.localtime(view["ts"]))
    lines = [f"{stamp}  source {view['source']}  interval {view['interval_s']:.2f} s" + (f"  {header}" if header else "")]
    names = ", ".join(
        f"{pid} {printable(sample.processes[pid].comm)}" if pid in sample.processes else str(pid) for pid in waits["pids"][:6]
    )
    more = f" (+{len(waits['pids']) - 6} more)" if len(waits["pids"]) > 6 else ""
    lines.append(f"protected: {len(waits['pids'])} processes, {waits['threads']} threads: {names or 'none found'}{more}")
    if waits["wakeups"] is None:
        lines.append(f"  run-queue waits {waits['waits']} (timeslices), total {_fmt_us(waits['wait_us_total'])}")
    else:
        lines.append(
            f"  run-queue waits {waits['waits']} (wakeups {waits['wakeups']}, preemptions {waits['preemptions']}), "
            f"total {_fmt_us(waits['wait_us_total'])}"
        )
    lines.append(
        f"  p50 {_fmt_us(waits['p50_us'])}   p99 {_fmt_us(waits['p99_us'])}   "
        f"p99.9 {_fmt_us(waits['p999_us'])}   max {_fmt_us(waits['max_us'])}"
    )
    if waits["behind_own_us"] is not None and waits["wait_us_total"]:
        total = waits["wait_us_total"]
        lines.append(
            f"  waited behind: own threads {waits['behind_own_us'] / total:.0%}, others {waits['behind_others_us'] / total:.0%}, "
            f"unattributed {waits['unattributed_us'] / total:.0%}"
        )
    rows = histogram.log2_rows(sample.protected.counts()) if waits["histogram"] is not None else []
    if rows:
        largest = max(count for _, _, count in rows)
        lines.append(f"     {'usecs':>19} : count     distribution")
        for low, high, count in rows:
            lines.append(f"     {low:>8} -> {high:<8} : {count:<8} |{_bar(count, largest)}|")
    for limitation in view["limitations"]:
        lines.append(f"  ({limitation})")
    if view["lost"]:
        lines.append("  lost: " + ", ".join(f"{name} {count}" for name, count in view["lost"].items()))

    peak_note = f"peak of {sample.window_ns / 1e6:.0f} ms windows" if sample.window_ns else "no sub-interval peaks"
    lines.append(f"top CPU (CPUs: mean over the interval / {peak_note}):")
    lines.append(f"  {'PID':>7}  {'COMM':<16} {'CPU':>6} {'PEAK':>6}")
    for entry in view["top_cpu"]:
        peak = "-" if entry["peak_cpu"] is None else f"{entry['peak_cpu']:.2f}"
        mark = "  (protected)" if entry["protected"] else ""
        lines.append(f"  {entry['pid']:>7}  {printable(entry['comm'])[:16]:<16} {entry['cpu']:>6.2f} {peak:>6}{mark}")
    if waits["histogram"] is not None:
        lines.append("top blame (on the CPU while protected threads waited):")
        lines.append(f"  {'PID':>7}  {'COMM':<16} {'BLAME':>10} {'SHARE':>6}")
        for entry in view["top_blame"]:
            mark = "  (protected)" if entry["protected"] else ""
            lines.append(
                f"  {entry['pid']:>7}  {printable(entry['comm'])[:16]:<16} {_fmt_us(entry['blame_us']):>10} {entry['share'] * 100:>5.0f}%{mark}"
            )
    return "\n".join(printable(line) for line in lines)  # (whatever else a line carries)
