"""What the probes cost per context switch, next to bcc's runqlat, measured side by side in one run.

A C ping-pong (two processes on one CPU bouncing a byte over pipes: two context switches per round
trip) runs with no tracer, with Debian's runqlat-bpfcc attached, and with `remediator watch`
attached, once protecting an unrelated process (the usual case: most switches are not the
service's) and once protecting the ping-pong itself (the worst case: every switch ends a protected
wait, with histogram, maximum and blame walk). A fifth configuration attaches two empty programs to
sched_switch and sched_wakeup: the floor that any tracepoint-based tool pays on this machine before
doing anything. The configurations are interleaved over several
rounds and compared by median, so the machine's noise falls on all of them alike.

Timing rounds run with kernel.bpf_stats_enabled=0 (stats add two clock reads to every program run);
one more pass per tracer with it set to 1 (restored afterwards) reads each program's
run_time_ns / run_cnt from the tracer's BPF program file descriptors.

With `--old-ref REF` (e.g. main) the remediator configurations also run with that git ref's
remediator/ and probes/ (extracted into a temporary directory), interleaved with this tree's in the
same rounds: `remediator-unrelated@old`, `remediator-protected@old`, and the ratio of the two.

    sudo ./bootstrap bench probe_overhead [--rounds 5] [--round-trips 200000] [--old-ref main]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import old_ref

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
VENV_BIN = Path(sys.executable).parent
OLD_TREE: Path | None = None  # set by --old-ref


def build_pingpong() -> Path:
    OUT.mkdir(exist_ok=True)
    binary = OUT / "pingpong"
    source = HERE / "pingpong.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def prog_stats(pid: int) -> list[dict]:
    """run_time_ns and run_cnt of every BPF program a process holds, named via bpftool."""
    programs = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        prog_id = int(fields["prog_id"])
        name = str(prog_id)
        if shutil.which("bpftool"):
            shown = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "--json"], capture_output=True, text=True)
            if shown.returncode == 0:
                name = json.loads(shown.stdout).get("name", name)
        programs.append({"id": prog_id, "name": name, "run_time_ns": int(fields["run_time_ns"]), "run_cnt": int(fields["run_cnt"])})
    return sorted(programs, key=lambda p: p["name"])


EMPTY_PROGRAMS = """
import signal, sys
from bcc import BPF
bpf = BPF(text="TRACEPOINT_PROBE(sched, sched_switch) { return 0; } TRACEPOINT_PROBE(sched, sched_wakeup) { return 0; }")
print("ready", flush=True)
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
signal.pause()
"""


class Tracer:
    """A tracer process started for one run; ready once its programs are attached."""

    def __init__(self, kind: str, pingpong_pids: tuple[int, int]):
        self.kind = kind
        self.proc = None
        if kind == "runqlat":
            # Tracing starts once it prints its banner; 99 s interval: it stays silent until killed.
            self.proc = subprocess.Popen(["runqlat-bpfcc", "99", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._wait_for(lambda line: "Tracing" in line)
        elif kind == "empty-programs":
            self.proc = subprocess.Popen([sys.executable, "-c", EMPTY_PROGRAMS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._wait_for(lambda line: line.startswith("ready"))
        elif kind.startswith("remediator"):
            protect = list(pingpong_pids) if kind.startswith("remediator-protected") else [os.getpid()]
            argv = [str(VENV_BIN / "remediator"), "watch", "--json", "-i", "1"]
            env = None
            if kind.endswith("@old"):
                argv = [sys.executable, "-m", "remediator", "watch", "--json", "-i", "1"]
                env = old_ref.environment(OLD_TREE)
            for pid in protect:
                argv += ["--pid", str(pid)]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                         cwd=str(OLD_TREE) if env else None)
            self._wait_for(lambda line: line.startswith("{"))

    def _wait_for(self, ready) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.kind} exited before it was ready")
            if ready(line):
                return
        raise RuntimeError(f"{self.kind} not ready in 60 s")

    def stop(self) -> list[dict]:
        if self.proc is None:
            return []
        stats = prog_stats(self.proc.pid)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return stats


def run_once(binary: Path, kind: str, round_trips: int, cpu: int) -> dict:
    pingpong = subprocess.Popen([str(binary), str(round_trips), str(cpu)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _, parent, child = pingpong.stdout.readline().split()
        tracer = Tracer(kind, (int(parent), int(child)))
        try:
            time.sleep(0.5)
            pingpong.stdin.write("go\n")
            pingpong.stdin.flush()
            elapsed, trips, switches = map(int, pingpong.stdout.readline().split())
        finally:
            programs = tracer.stop()
    finally:
        pingpong.kill()
        pingpong.wait()
    return {"kind": kind, "ns_per_round_trip": elapsed / trips, "switches_per_round_trip": switches / trips, "programs": programs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=200_000)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--old-ref", default=None, help="also run the remediator configurations with this git ref's probes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("probe_overhead: run as root (sudo ./bootstrap bench probe_overhead)", file=sys.stderr)
        return 1
    if shutil.which("runqlat-bpfcc") is None:
        print("probe_overhead: runqlat-bpfcc not found (apt install bpfcc-tools)", file=sys.stderr)
        return 1
    binary = build_pingpong()
    kinds = ["none", "empty-programs", "runqlat", "remediator-unrelated", "remediator-protected"]
    if args.old_ref:
        import tempfile

        global OLD_TREE
        OLD_TREE = old_ref.extract(args.old_ref, Path(tempfile.mkdtemp(prefix="probe-overhead-old-")))
        kinds += ["remediator-unrelated@old", "remediator-protected@old"]
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    saved = stats_path.read_text().strip()
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    program_runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    try:
        stats_path.write_text("0")
        for round_index in range(args.rounds):
            order = kinds[round_index % len(kinds):] + kinds[: round_index % len(kinds)]  # rotate the order
            for kind in order:
                results[kind].append(run_once(binary, kind, args.round_trips, args.cpu))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{kind} {results[kind][-1]['ns_per_round_trip']:.0f} ns" for kind in kinds), file=sys.stderr)
        stats_path.write_text("1")
        for kind in kinds[1:]:
            program_runs[kind].append(run_once(binary, kind, args.round_trips, args.cpu))
    finally:
        stats_path.write_text(saved)

    base = statistics.median(r["ns_per_round_trip"] for r in results["none"])
    rows = []
    for kind in kinds:
        runs = results[kind]
        median_trip = statistics.median(r["ns_per_round_trip"] for r in runs)
        switches = statistics.median(r["switches_per_round_trip"] for r in runs)
        added = (median_trip - base) / switches if kind != "none" else 0.0
        per_program: dict[str, list[float]] = {}
        for run in program_runs[kind]:
            for program in run["programs"]:
                if program["run_cnt"]:
                    per_program.setdefault(program["name"], []).append(program["run_time_ns"] / program["run_cnt"])
        rows.append({
            "config": kind,
            "median_ns_per_round_trip": round(median_trip, 1),
            "ratio_to_none": round(median_trip / base, 3),
            "added_ns_per_switch": round(added, 1),
            "programs_ns_per_run": {name: round(statistics.median(values), 1) for name, values in sorted(per_program.items())},
        })

    print(f"\nContext-switch ping-pong, {args.round_trips} round trips x {args.rounds} rounds, medians "
          f"(~{statistics.median(r['switches_per_round_trip'] for r in results['none']):.1f} switches per round trip)\n")
    print("| configuration | ns per round trip | vs none | added ns per switch | BPF run_time_ns / run_cnt per program |")
    print("|---|---|---|---|---|")
    for row in rows:
        programs = ", ".join(f"{name} {ns:.0f}" for name, ns in row["programs_ns_per_run"].items()) or "-"
        print(f"| {row['config']} | {row['median_ns_per_round_trip']:.0f} | {row['ratio_to_none']:.3f}x | "
              f"{row['added_ns_per_switch']:.0f} | {programs} |")
    ours = next(r for r in rows if r["config"] == "remediator-protected")["added_ns_per_switch"]
    theirs = next(r for r in rows if r["config"] == "runqlat")["added_ns_per_switch"]
    if args.old_ref:
        old = next(r for r in rows if r["config"] == "remediator-protected@old")["added_ns_per_switch"]
        old_unrelated = next(r for r in rows if r["config"] == "remediator-unrelated@old")["added_ns_per_switch"]
        new_unrelated = next(r for r in rows if r["config"] == "remediator-unrelated")["added_ns_per_switch"]
        print(f"\nthis tree / {args.old_ref}, added ns per switch: protected {ours:.0f} / {old:.0f} = {ours / old:.2f}x, "
              f"unrelated {new_unrelated:.0f} / {old_unrelated:.0f} = {new_unrelated / old_unrelated:.2f}x")
    print(f"\nours (worst case, every switch protected) / runqlat: {ours / theirs:.2f}x added per switch; "
          f"target: <= 1.0x and <= 300 ns -> {'met' if ours <= theirs and ours <= 300 else 'NOT met'}")
    OUT.mkdir(exist_ok=True)
    (OUT / "probe_overhead.json").write_text(json.dumps({"rows": rows, "runs": results, "program_runs": program_runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
