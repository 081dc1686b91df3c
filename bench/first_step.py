"""Which first step works best against a bursting sidecar: nice, SCHED_IDLE, or the cgroup's cpu weight.

Nice and SCHED_IDLE weigh threads against each other inside one scheduling group. On a systemd host
every service runs in its own cgroup (and with autogroup every session is its own group), and there
a thread's nice changes nothing between the groups: the cgroup-level knobs (cpu.weight, cpu.idle)
are what weigh a sidecar against the service. This benchmark measures each first step in two layouts:

  A  one group     server, client and sidecar in one session, as in bench/incident.py
  B  systemd-like  server+client in one v1 cpu cgroup, the sidecar in another, both cpu.shares 1024
                   (equal weights, as units have); bench-first-step-* under the cpu hierarchy

and for each layout these configurations, the step applied to the sidecar from its start through
remediator's own executor and actuators (the real ones), and restored at the end of the run:

  none         no step (the baseline)
  nice-10      nice = 10
  sched-idle   sched = "idle"
  cpu-weight   cpu_weight = 10
  cpu-idle     cpu_idle = true
  hand-fix     the sidecar pinned off the request CPU by hand (reference)

On this cgroup v1 host the cpu actuator moves the sidecar into remediator-<policy> at the root of
the cpu hierarchy, as it would on any v1 host; in layout B that takes it out of its bench group, and
the group it lands in is a sibling of the service's group, so the comparison holds (service group at
1024 against a sidecar group at 102 or idle). The workloads are bench/incident.py's (server, open-loop
Poisson client on the request CPU, fluent-bit-like sidecar: 2 zlib threads, 400 ms bursts every 3 s).
Configurations and layouts take turns in an order rotated each round; the table quotes medians over
rounds and each one's ratio to the same layout's baseline.

With --after-onset the question is the one burst detection leaves: once a burst is detected, which
step stops the harm fastest? Every burst then comes from a new sidecar process (as in the incident
benchmark's detection run), and the step is applied to it --detect-ms after the burst's onset (the
detection latency measured there), burst after burst; "none" applies nothing. Per burst, from the
moment the step is in place: the worst latency of the requests sent after it, and the time to relief
(from the step until every request sent for the next 20 ms takes at most --relief-ms). The
table quotes medians over bursts, side by side, with each step's ratio to none:

  none, nice-10, sched-idle, affinity (the sidecar moved off the request CPU), cpu-weight, cpu-idle

    sudo ./bootstrap bench first_step             ~6 minutes; writes bench/out/first_step.{md,json}
    sudo .venv/bin/python bench/first_step.py --after-onset --layouts A     ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from incident import (  # noqa: E402  (the same workloads and percentiles as the incident benchmark)
    OTHER_CPU,
    ROOT,
    add_workload_arguments,
    interrupted,
    latency_figures,
    loadgen_argv,
    on_all_cpus,
    server_argv,
    stop_tree,
    workload_sidecar_argv,
)

sys.path.insert(0, str(ROOT))
from remediator.actuators import default_actuators  # noqa: E402
from remediator.cgroupfs import discover_cpu_mount  # noqa: E402
from remediator.executor import Executor  # noqa: E402
from remediator.model import ActionRequest  # noqa: E402
from remediator.journal import Journal  # noqa: E402
from remediator.procfs import ProcFS  # noqa: E402

POLICY = "bench-first-step"  # the cpu actuator's group: remediator-bench-first-step
GROUP_PREFIX = "bench-first-step-"
LAYOUTS = {"A": "one group (one session)", "B": "systemd-like (own cpu cgroups, equal weights)"}
# configuration -> the request's kind and setting (None: no request)
STEPS: dict[str, tuple[str, dict] | None] = {  # (kind, the request's params)
    "none": None,
    "nice-10": ("nice", {"nice": 10}),
    "sched-idle": ("sched", {"sched": "idle"}),
    "cpu-weight": ("cpu", {"cpu": {"weight": 10}, "group": POLICY}),
    "cpu-idle": ("cpu", {"cpu": {"idle": 1}, "group": POLICY}),
    "hand-fix": None,
    "affinity": ("affinity", {"cpus": [OTHER_CPU]}),
}
FROM_START_CONFIGS = ("none", "nice-10", "sched-idle", "cpu-weight", "cpu-idle", "hand-fix")
AFTER_ONSET_CONFIGS = ("none", "nice-10", "sched-idle", "affinity")


class Groups:
    """Layout B's two cpu cgroups of equal weight, removed on close (their tasks moved back to the root)."""

    def __init__(self, mount_point: Path):
        self.mount_point = mount_point
        self.service = mount_point / f"{GROUP_PREFIX}service"
        self.sidecar = mount_point / f"{GROUP_PREFIX}sidecar"
        for group in (self.service, self.sidecar):
            group.mkdir(exist_ok=True)
            (group / "cpu.shares").write_text("1024")

    def close(self) -> None:
        for group in (self.service, self.sidecar):
            if not group.exists():
                continue
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    (self.mount_point / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # gone meanwhile
            group.rmdir()


def joining(group: Path | None):
    """preexec_fn: the child on all CPUs and, in layout B, in its cgroup before it execs."""

    def prepare() -> None:
        on_all_cpus()
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    return prepare


def make_executor(journal_path: Path) -> Executor:
    procfs = ProcFS()
    # The sidecar is this script's child; remediator refuses its own children, so self_pid is no real pid.
    return Executor(Journal(journal_path), procfs, dry_run=False, actuators=default_actuators(procfs), self_pid=0)


def fresh_directory(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("latency.txt", "bursts.txt", "journal.jsonl"):
        (directory / stale).unlink(missing_ok=True)
    return directory


def start_workloads(layout: str, groups: Groups | None, args: argparse.Namespace, directory: Path,
                    processes: list[subprocess.Popen], fork_per_burst: bool):
    """Server, sidecar and client in `layout` (each added to `processes` as it starts, for the caller to stop)."""
    service_group = groups.service if layout == "B" else None
    sidecar_group = groups.sidecar if layout == "B" else None
    server = subprocess.Popen(server_argv(args), stdout=subprocess.PIPE, text=True, preexec_fn=joining(service_group))
    processes.append(server)
    port = int(server.stdout.readline().split("port=")[1])
    start_at = time.time() + args.warmup
    sidecar = subprocess.Popen(workload_sidecar_argv(args, directory, start_at) + (["--fork-per-burst"] if fork_per_burst else []),
                               stdout=subprocess.PIPE, text=True, preexec_fn=joining(sidecar_group))
    processes.append(sidecar)
    sidecar.stdout.readline()
    client = subprocess.Popen(loadgen_argv(args, port, args.duration, directory, start_at), stdout=subprocess.PIPE,
                              text=True, preexec_fn=joining(service_group))
    processes.append(client)
    client.stdout.readline()
    return server, sidecar, client


def run_once(config: str, layout: str, groups: Groups | None, args: argparse.Namespace, directory: Path) -> dict:
    """One run: server, client and sidecar in `layout`, the step applied to the sidecar from its start."""
    processes: list[subprocess.Popen] = []
    executor = make_executor(fresh_directory(directory) / "journal.jsonl")
    result: dict = {"config": config, "layout": layout}
    try:
        server, sidecar, client = start_workloads(layout, groups, args, directory, processes, fork_per_burst=False)
        step = STEPS[config]
        if step is not None:
            kind, params = step
            request = ActionRequest(executor.procfs.identity(sidecar.pid), kind, POLICY, 0, params)
            outcome = executor.apply(request, protected_pids=(server.pid, client.pid))
            if outcome.status != "applied":
                raise RuntimeError(f"{config} in layout {layout}: {outcome}")
            result["change"] = outcome.message
        elif config == "hand-fix":
            # Before the first burst; the burst threads are created later and inherit it.
            for tid in os.listdir(f"/proc/{sidecar.pid}/task"):
                os.sched_setaffinity(int(tid), {OTHER_CPU})
            result["change"] = f"sched_setaffinity(tid, {{{OTHER_CPU}}}) by hand"
        result["sidecar_cgroup"] = cpu_cgroup(sidecar.pid)
        client.wait(timeout=args.duration + args.warmup + 120)
        if client.returncode != 0:
            raise RuntimeError(f"{config} in layout {layout}: the client exited with {client.returncode}")
    finally:
        for outcome in executor.restore():
            if outcome.status != "restored":
                print(f"  restore: {outcome}", file=sys.stderr)
        executor.journal.close()
        for proc in reversed(processes):
            stop_tree(proc)
    latency_ms = [float(line.split()[1]) for line in (directory / "latency.txt").read_text().splitlines()]
    bursts = (directory / "bursts.txt").read_text().splitlines() if (directory / "bursts.txt").exists() else []
    return {**result, "requests": len(latency_ms), "bursts": len(bursts), **latency_figures(latency_ms)}


def follow_bursts(bursts_file: Path, stop, on_burst) -> None:
    """Call on_burst(onset, pid) for each line the sidecar appends to `bursts_file`, until stop is set."""
    offset = 0
    pending = ""
    while not stop.is_set():
        if bursts_file.exists():
            with open(bursts_file) as file:
                file.seek(offset)
                pending += file.read()
                offset = file.tell()
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                when, pid = line.split()[:2]
                on_burst(float(when), int(pid))
        stop.wait(0.001)


def run_after_onset(config: str, layout: str, groups: Groups | None, args: argparse.Namespace, directory: Path) -> dict:
    """One run: every burst from a new sidecar process, the step applied to it --detect-ms after its onset."""

    processes: list[subprocess.Popen] = []
    executor = make_executor(fresh_directory(directory) / "journal.jsonl")
    steps: list[tuple[float, float, int]] = []  # (onset, step in place, pid)
    failures: list[str] = []
    stop = threading.Event()
    follower = None
    try:
        server, _sidecar, client = start_workloads(layout, groups, args, directory, processes, fork_per_burst=True)
        step = STEPS[config]

        def on_burst(onset: float, pid: int) -> None:
            time.sleep(max(0.0, onset + args.detect_ms / 1000 - time.time()))
            if step is None:
                steps.append((onset, time.time(), pid))
                return
            kind, params = step
            try:
                request = ActionRequest(executor.procfs.identity(pid), kind, POLICY, 0, params)
                outcome = executor.apply(request, protected_pids=(server.pid, client.pid))
            except Exception as exc:  # the child gone early: counted, not fatal
                failures.append(f"{pid}: {exc}")
                return
            if outcome.status != "applied":
                failures.append(f"{pid}: {outcome}")
                return
            steps.append((onset, time.time(), pid))

        follower = threading.Thread(target=follow_bursts, args=(directory / "bursts.txt", stop, on_burst), daemon=True)
        follower.start()
        client.wait(timeout=args.duration + args.warmup + 120)
        if client.returncode != 0:
            raise RuntimeError(f"{config} in layout {layout}: the client exited with {client.returncode}")
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)
        executor.restore()
        executor.journal.close()
        for proc in reversed(processes):
            stop_tree(proc)
    requests = [tuple(map(float, line.split())) for line in (directory / "latency.txt").read_text().splitlines()]
    per_burst = []
    for onset, in_place, _pid in steps:
        burst_end = onset + args.burst_ms / 1000
        after = [(sent, latency) for sent, latency in requests if in_place <= sent <= burst_end]
        if not after:
            continue
        per_burst.append({"step_ms": (in_place - onset) * 1000, "worst_after_ms": max(latency for _, latency in after),
                          "relief_ms": (relief_at(after, args.relief_ms, burst_end) - in_place) * 1000})
    return {"config": config, "layout": layout, "bursts": per_burst, "failures": failures}


RELIEF_HOLDS_S = 0.02  # relief: every request sent for this long after it is under the threshold


def relief_at(requests: list[tuple[float, float]], threshold_ms: float, burst_end: float) -> float:
    """When relief came: the first send time from which every request sent within RELIEF_HOLDS_S
    took at most threshold_ms (the burst's end when that never happened)."""
    for index, (sent, _latency) in enumerate(requests):
        window = [latency for when, latency in requests[index:] if when <= sent + RELIEF_HOLDS_S]
        if all(latency <= threshold_ms for latency in window):
            return sent
    return burst_end


def summarise_after_onset(runs: list[dict], configs: list[str], layouts: list[str]) -> dict:
    """Per layout and configuration: medians over every burst of every round, and ratios to none."""
    table: dict = {}
    for layout in layouts:
        table[layout] = {}
        for config in configs:
            bursts = [burst for run in runs if run["layout"] == layout and run["config"] == config for burst in run["bursts"]]
            if bursts:
                table[layout][config] = {
                    "bursts": len(bursts),
                    "failures": sum(len(run["failures"]) for run in runs if run["layout"] == layout and run["config"] == config),
                    **{key: round(statistics.median(burst[key] for burst in bursts), 2)
                       for key in ("step_ms", "worst_after_ms", "relief_ms")},
                }
        add_ratios_to_none(table[layout], ("worst_after_ms", "relief_ms"))
    return table


def markdown_after_onset(table: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Load {args.rate:g} req/s (Poisson, seed {args.seed}), {args.duration:g} s per run, {args.rounds} rounds (order "
        f"rotated); every {args.burst_ms:g} ms burst from a new sidecar process, the step applied by remediator's executor "
        f"{args.detect_ms:g} ms after the onset (detection). Per burst, from the step in place to the burst's end: the "
        f"worst request latency, and the time to relief (until every request sent for {RELIEF_HOLDS_S * 1000:g} ms takes "
        f"at most {args.relief_ms:g} ms). Medians over "
        "bursts; ratio to none (lower is better).",
        "",
        "| layout | first step | bursts | step in place after onset ms | worst after the step ms | time to relief ms | "
        "worst vs none | relief vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layout, rows in table.items():
        for config, row in rows.items():
            ratios = row.get("vs_none", {})
            failed = f" ({row['failures']} steps failed)" if row["failures"] else ""
            lines.append(f"| {layout} | {config} | {row['bursts']}{failed} | "
                         f"{row['step_ms']} | {row['worst_after_ms']} | {row['relief_ms']} | "
                         f"{ratios.get('worst_after_ms', '-')} | {ratios.get('relief_ms', '-')} |")
    return "\n".join(lines) + "\n"


def cpu_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "?"


FIGURES = ("p50_ms", "p99_ms", "p999_ms", "max_ms")


def summarise(runs: list[dict], configs: list[str], layouts: list[str]) -> dict:
    """Per layout and configuration: the median of each figure over rounds, and its ratio to the baseline's."""
    table: dict = {}
    for layout in layouts:
        table[layout] = {}
        for config in configs:
            mine = [run for run in runs if run["layout"] == layout and run["config"] == config]
            if mine:
                table[layout][config] = {figure: round(statistics.median(run[figure] for run in mine), 2) for figure in FIGURES}
                table[layout][config]["rounds"] = len(mine)
        add_ratios_to_none(table[layout], FIGURES)
    return table


def add_ratios_to_none(rows: dict, figures) -> None:
    """Each row's figures as ratios to the "none" row's (None where that one is 0)."""
    baseline = rows.get("none")
    if baseline:
        for row in rows.values():
            row["vs_none"] = {figure: round(row[figure] / baseline[figure], 2) if baseline[figure] else None
                              for figure in figures}


def markdown(table: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Load {args.rate:g} req/s (Poisson, seed {args.seed}) for {args.duration:g} s per run, {args.rounds} rounds "
        f"(order rotated each round), medians over rounds; server work {args.work_us:g} us per request on CPU 0; "
        f"sidecar fluent-bit: {args.threads} zlib threads, {args.burst_ms:g} ms bursts every {args.period_ms / 1000:g} s; "
        "each step applied to the sidecar from its start by remediator's executor. Ratio: to the same layout's "
        "baseline (lower is better).",
        "",
        "| layout | first step | p50 ms | p99 ms | p99.9 ms | max ms | p99 vs none | p99.9 vs none | max vs none |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, rows in table.items():
        for config, row in rows.items():
            ratios = row.get("vs_none", {})
            lines.append(
                f"| {layout}: {LAYOUTS[layout]} | {config} | {row['p50_ms']} | {row['p99_ms']} | {row['p999_ms']} | "
                f"{row['max_ms']} | {ratios.get('p99_ms', '-')} | {ratios.get('p999_ms', '-')} | {ratios.get('max_ms', '-')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per run (4 bursts)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds for the processes to start")
    parser.add_argument("--configs", help=f"default: {','.join(FROM_START_CONFIGS)}; with --after-onset "
                        f"{','.join(AFTER_ONSET_CONFIGS)}")
    parser.add_argument("--after-onset", action="store_true",
                        help="apply the step --detect-ms after each burst's onset, each burst from a new process")
    parser.add_argument("--detect-ms", type=float, default=50.0, help="with --after-onset: detection latency assumed")
    parser.add_argument("--relief-ms", type=float, default=10.0,
                        help="with --after-onset: relief when requests take at most this (about the p99.9 between bursts here)")
    parser.add_argument("--layouts", default="A,B")
    parser.add_argument("--out", default=str(HERE / "out" / "first_step"))
    add_workload_arguments(parser)
    args = parser.parse_args()
    configs = (args.configs or ",".join(AFTER_ONSET_CONFIGS if args.after_onset else FROM_START_CONFIGS)).split(",")
    layouts = args.layouts.split(",")
    if args.after_onset and "hand-fix" in configs:
        parser.error("hand-fix is a from-the-start configuration; with --after-onset use affinity")
    if unknown := [c for c in configs if c not in STEPS] + [lay for lay in layouts if lay not in LAYOUTS]:
        parser.error(f"unknown configuration or layout: {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("first_step: run as root (sudo ./bootstrap bench first_step)", file=sys.stderr)
        return 1
    if len(os.sched_getaffinity(0)) < 2:
        print("first_step: needs two CPUs", file=sys.stderr)
        return 1
    mount = discover_cpu_mount()
    if "B" in layouts and (mount is None or mount.version != 1):
        print("first_step: layout B needs the cgroup v1 cpu hierarchy (use --layouts A)", file=sys.stderr)
        return 1
    # SIGTERM as Ctrl-C: the runs restore their step and the bench groups are removed.
    signal.signal(signal.SIGTERM, interrupted)
    os.sched_setaffinity(0, {OTHER_CPU})  # the orchestrator stays off the request CPU
    out = Path(args.out)
    pairs = [(layout, config) for config in configs for layout in layouts]
    runs: list[dict] = []
    groups = Groups(mount.mount_point) if "B" in layouts else None
    try:
        for round_index in range(args.rounds):
            shift = round_index * len(pairs) // args.rounds
            for layout, config in pairs[shift:] + pairs[:shift]:
                print(f"round {round_index + 1}/{args.rounds}: layout {layout}, {config} ...", file=sys.stderr, flush=True)
                directory = out / layout / config / f"round-{round_index + 1}"
                if args.after_onset:
                    run = run_after_onset(config, layout, groups, args, directory)
                    runs.append(run)
                    print(f"  {len(run['bursts'])} bursts, {len(run['failures'])} steps failed", file=sys.stderr, flush=True)
                    continue
                run = run_once(config, layout, groups, args, directory)
                run["round"] = round_index + 1
                runs.append(run)
                print(f"  p99 {run['p99_ms']} ms, p99.9 {run['p999_ms']} ms, max {run['max_ms']} ms "
                      f"({run['requests']} requests, {run['bursts']} bursts; sidecar in {run['sidecar_cgroup']})",
                      file=sys.stderr, flush=True)
    finally:
        if groups is not None:
            groups.close()
    if args.after_onset:
        name, table = "first_step_after_onset", summarise_after_onset(runs, configs, layouts)
        text = markdown_after_onset(table, args)
    else:
        name, table = "first_step", summarise(runs, configs, layouts)
        text = markdown(table, args)
    (out.parent / f"{name}.json").write_text(json.dumps({"args": vars(args), "table": table, "runs": runs}, indent=1))
    (out.parent / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
