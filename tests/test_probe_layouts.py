"""One source of truth for the map layouts: the C header, compiled with gcc under the loader's own
-D settings, against the struct formats remediator/probes.py reads the maps with. A field added,
moved or resized on one side only fails here, not as garbage numbers on a live host."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from remediator.probes import TASK_RENAMED, WAIT_TOTAL_FIELDS, ProbeSettings, SchedProbes

PROBES = Path(__file__).resolve().parent.parent / "probes"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to compile the probe header")


def c_layout(tmp_path: Path, settings: ProbeSettings) -> dict[str, int]:
    """sizeof and offsetof of every map value field, as gcc lays out the header."""
    queries = {
        "sizeof protected_thread": "sizeof(struct protected_thread)",
        "protected_thread.wait_start": "offsetof(struct protected_thread, wait_start)",
        "protected_thread.queued_since": "offsetof(struct protected_thread, queued_since)",
        "protected_thread.wait_cpu": "offsetof(struct protected_thread, wait_cpu)",
        "sizeof wait_totals": "sizeof(struct wait_totals)",
        "sizeof wait_stats": "sizeof(struct wait_stats)",
        "wait_stats.max": "offsetof(struct wait_stats, max)",
        "wait_stats.hist": "offsetof(struct wait_stats, hist)",
        "sizeof cpu_state": "sizeof(struct cpu_state)",
        "cpu_state.since": "offsetof(struct cpu_state, since)",
        "cpu_state.busy_ns": "offsetof(struct cpu_state, busy_ns)",
        "cpu_state.current_tid": "offsetof(struct cpu_state, current_tid)",
        "cpu_state.head": "offsetof(struct cpu_state, head)",
        "cpu_state.owed_ns": "offsetof(struct cpu_state, owed_ns)",
        "cpu_state.changed_epoch": "offsetof(struct cpu_state, changed_epoch)",
        "cpu_state.changed_count": "offsetof(struct cpu_state, changed_count)",
        "cpu_state.segments": "offsetof(struct cpu_state, segments)",
        "sizeof run_segment": "sizeof(struct run_segment)",
        "run_segment.ns": "offsetof(struct run_segment, ns)",
        "run_segment.last_start": "offsetof(struct run_segment, last_start)",
        "run_segment.tgid": "offsetof(struct run_segment, tgid)",
        "sizeof proc_cpu_key": "sizeof(struct proc_cpu_key)",
        "sizeof proc_cpu": "sizeof(struct proc_cpu)",
        "proc_cpu.blame_ns": "offsetof(struct proc_cpu, blame_ns)",
        "proc_cpu.windows": "offsetof(struct proc_cpu, windows)",
        "proc_cpu.comm": "offsetof(struct proc_cpu, comm)",
        "proc_cpu.marked_epoch": "offsetof(struct proc_cpu, marked_epoch)",
        "proc_cpu.unreported_ns": "offsetof(struct proc_cpu, unreported_ns)",
        "sizeof exec_event": "sizeof(struct exec_event)",
        "exec_event.pid": "offsetof(struct exec_event, pid)",
        "exec_event.filename": "offsetof(struct exec_event, filename)",
        "sizeof task_event": "sizeof(struct task_event)",
        "task_event.kind": "offsetof(struct task_event, kind)",
        "TASK_RENAMED": "TASK_RENAMED",
    }
    for name in WAIT_TOTAL_FIELDS:
        queries[f"wait_totals.{name}"] = f"offsetof(struct wait_totals, {name})"
    lines = "".join(f'    printf("%s %zu\\n", "{key}", (size_t)({expr}));\n' for key, expr in queries.items())
    program = tmp_path / "layout.c"
    program.write_text(
        "#define SCHED_MONITOR_STANDALONE\n#include <stddef.h>\n#include <stdio.h>\n#include \"sched_monitor.h\"\n"
        f"int main(void)\n{{\n{lines}    return 0;\n}}\n"
    )
    binary = tmp_path / "layout"
    defines = [flag for flag in settings.cflags(0xFF) if flag.startswith("-D")]
    subprocess.run(["gcc", "-O0", f"-I{PROBES}", *defines, "-o", str(binary), str(program)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in (line.rsplit(" ", 1) for line in out.splitlines())}


def python_layout(settings: ProbeSettings) -> dict[str, int]:
    """The same sizes and offsets, from the struct formats the loader unpacks with."""
    layouts = settings.layouts()

    def offset(layout: struct.Struct, fields_before: int) -> int:
        return struct.calcsize(layout.format[: 1 + fields_before]) if fields_before else 0

    totals = len(WAIT_TOTAL_FIELDS)
    ring = settings.segment_ring
    expected = {
        "sizeof protected_thread": layouts["protected_thread"].size,
        "protected_thread.wait_start": 0,
        "protected_thread.queued_since": offset(layouts["protected_thread"], 1),
        "protected_thread.wait_cpu": offset(layouts["protected_thread"], 2),
        "sizeof wait_totals": 8 * totals,
        "sizeof wait_stats": layouts["wait_stats"].size,
        "wait_stats.max": 8 * totals,
        "wait_stats.hist": 8 * (totals + 4),
        "sizeof cpu_state": layouts["cpu_state"].size,
        "cpu_state.since": 0,
        "cpu_state.busy_ns": offset(layouts["cpu_state"], 1),
        "cpu_state.current_tid": offset(layouts["cpu_state"], 2),
        "cpu_state.head": offset(layouts["cpu_state"], 3),
        "cpu_state.owed_ns": offset(layouts["cpu_state"], 4),
        "cpu_state.changed_epoch": offset(layouts["cpu_state"], 5),
        "cpu_state.changed_count": offset(layouts["cpu_state"], 7),
        "cpu_state.segments": offset(layouts["cpu_state"], 9),
        "sizeof run_segment": (layouts["cpu_state"].size - offset(layouts["cpu_state"], 9)) // ring,
        "run_segment.ns": struct.calcsize("<QQ"),
        "run_segment.last_start": struct.calcsize("<QQQ"),
        "run_segment.tgid": struct.calcsize("<QQQQ"),
        "sizeof proc_cpu_key": layouts["proc_cpu_key"].size,
        "sizeof proc_cpu": layouts["proc_cpu"].size,
        "proc_cpu.blame_ns": 8,
        "proc_cpu.windows": 16,
        "proc_cpu.comm": 16 + 8 * settings.window_slots,
        "proc_cpu.marked_epoch": 32 + 8 * settings.window_slots,
        "proc_cpu.unreported_ns": 40 + 8 * settings.window_slots,
        # One ring carries both, told apart by size.
        "sizeof exec_event": SchedProbes._EXEC_EVENT.size,
        "exec_event.pid": 8,
        "exec_event.filename": 16,
        "sizeof task_event": SchedProbes._TASK_EVENT.size,
        "task_event.kind": 4,
        "TASK_RENAMED": TASK_RENAMED,
    }
    for index, name in enumerate(WAIT_TOTAL_FIELDS):
        expected[f"wait_totals.{name}"] = 8 * index
    return expected


@pytest.mark.parametrize(
    "settings",
    [ProbeSettings(max_cpus=2), ProbeSettings(max_cpus=192, segment_ring=4, window_slots=8)],
    ids=["defaults", "small-ring"],
)
def test_header_and_python_layouts_agree(tmp_path, settings):
    assert c_layout(tmp_path, settings) == python_layout(settings)


def test_every_header_setting_the_loader_passes_is_one_the_header_reads():
    header = (PROBES / "sched_monitor.h").read_text()
    for flag in ProbeSettings(max_cpus=2).cflags(0xFF):
        if flag.startswith("-D"):
            name = flag[2:].split("=", 1)[0]
            assert f"#ifndef {name}" in header, f"{name} is passed by the loader but the header has no default for it"
