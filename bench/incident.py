"""The incident that motivated remediator, as a benchmark: side by side, same seed, one invocation.

A request-serving process on loopback (bench/workloads/server.py, ~0.5 ms of CPU per request, on
the request CPU 0) takes open-loop Poisson load from a client on the same CPU (latency measured
from each request's scheduled time). A sidecar named fluent-bit idles, then compresses with zlib
on two threads for 400 ms every 3 s, on any CPU. The service owns CPU 0; the policies are the
shipped ones in policies/.

Runs:
  1. none       no remediator
  2. dry-run    remediator in dry-run: its overhead alone
  3. live       remediator live
  4. hand-fix   the fix from the story, from the start: the sidecar pinned to CPU 1 and reniced
  5. detection  remediator live while every burst comes from a new sidecar process, so each burst
                must be detected afresh: detection-to-action latency from burst onset

Every run also records the protected threads' run-queue waits with `remediator record` (the same
probes), so the table can show the kernel's side next to the requests'.

SCHEDULING: server, client and sidecar share one session, so they compete as plain tasks, as on a
host whose agent and service share a cgroup (or a cgroup v1 host without the cpu controller). In
separate sessions (autogroup) or separate cgroups with equal CPU weights, the scheduler shares CPU
per group, the sidecar gets at most a third of the service's CPU here, and the same bursts hurt less.

    sudo ./bootstrap bench incident              ~12 minutes; writes bench/out/incident.{md,json,png}
    sudo ./bootstrap bench incident --publish    also copies the table and picture to docs/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = HERE / "workloads"
REMEDIATOR = str(Path(sys.executable).with_name("remediator"))
PYTHON = sys.executable
REQUEST_CPU, OTHER_CPU = 0, 1

sys.path.insert(0, str(ROOT))
from remediator import histogram  # noqa: E402
from remediator.placement import CGROUP_PREFIX  # noqa: E402
from remediator.sample import read_samples  # noqa: E402

TARGETS = {
    "live_vs_none_p99": 5.0,  # live p99 at least 5x better than none
    "live_vs_hand_fix_p99": 1.5,  # and within 1.5x of the hand fix
    "detection_median_s": 0.05,  # issue 14: event-driven detection (tail.within)
    "detection_p95_s": 0.1,
    "live_vs_hand_fix_p999": 1.3,
    "live_vs_hand_fix_max": 1.3,
    "detection_vs_live_p99": 2.0,
    "dry_run_vs_none_p99": 1.1,
    "daemon_cpu_percent": 1.0,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def server_argv(args: argparse.Namespace) -> list[str]:
    return [PYTHON, str(WORKLOADS / "server.py"), "--cpu", str(REQUEST_CPU), "--work-us", str(args.work_us)]


def workload_sidecar_argv(args: argparse.Namespace, directory: Path, start_at: float) -> list[str]:
    return [PYTHON, str(WORKLOADS / "sidecar.py"), "--comm", "fluent-bit", "--threads", str(args.threads),
            "--burst-ms", str(args.burst_ms), "--period-ms", str(args.period_ms), "--first-after-ms", "2000",
            "--bursts-out", str(directory / "bursts.txt"), "--start-at", str(start_at),
            # onsets at every phase of the daemon's tick, the same schedule in every run
            "--jitter-ms", str(args.jitter_ms), "--seed", str(args.seed)]


def loadgen_argv(args: argparse.Namespace, port: int, duration: float, directory: Path, start_at: float) -> list[str]:
    return [PYTHON, str(WORKLOADS / "loadgen.py"), "--port", str(port), "--rate", str(args.rate),
            "--duration", str(duration), "--seed", str(args.seed), "--out", str(directory / "latency.txt"),
            "--cpu", str(REQUEST_CPU), "--start-at", str(start_at)]


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The load and the sidecar's bursts, the same defaults in every benchmark that uses them."""
    parser.add_argument("--rate", type=float, default=1300.0)
    parser.add_argument("--work-us", type=float, default=500.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--burst-ms", type=float, default=400.0)
    parser.add_argument("--period-ms", type=float, default=3000.0)
    parser.add_argument("--jitter-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=1)


def latency_figures(latency_ms: list[float]) -> dict:
    """Request latency p50, p99, p99.9 and max, in ms."""
    return {
        "p50_ms": round(percentile(latency_ms, 50), 2),
        "p99_ms": round(percentile(latency_ms, 99), 2),
        "p999_ms": round(percentile(latency_ms, 99.9), 2),
        "max_ms": round(max(latency_ms), 2),
    }


def on_cpu(cpu: int):
    return lambda: os.sched_setaffinity(0, {cpu})


def on_all_cpus() -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


class NotifyListener:
    """Collects sd_notify datagrams with their arrival times."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            path.unlink()
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.socket.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def first(self, predicate) -> float | None:
        for when, message in list(self.messages):
            if predicate(message):
                return when
        return None

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        self.socket.close()


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop a started process and anything it forked (the sidecar's per-burst children)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        if "run" in proc.args[1:3]:
            # The daemon: SIGTERM, so that it gives back every change (revert_on_exit) and leaves no group.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.send_signal(signal.SIGINT if proc.args[1:2] == ["record"] else signal.SIGKILL)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def write_config(directory: Path, protect: list[int], mode: str, tick_ms: float = 250.0) -> Path:
    config = directory / "remediator.toml"
    config.write_text(
        f"""# generated by bench/incident.py
[protect]
pids = {protect}
request_cpus = "{REQUEST_CPU}"
[daemon]
mode = "{mode}"
tick = "{tick_ms:g}ms"
policies = ["{ROOT / 'policies'}"]
journal = "{directory / 'journal.jsonl'}"
audit_log = "{directory / 'audit.jsonl'}"
on_start = "restore"
revert_on_exit = true
[limits]
# the detection run changes a new process every burst (20 a minute)
max_changes_per_minute = 60
"""
    )
    return config


def in_place_at(audit_line: dict) -> float:
    """When an applied change was in place: `changed_epoch` (after the last write), not `epoch` (the
    decision, before the journal's fsync and the writes themselves: a cgroup move waits for an RCU
    grace period, several milliseconds)."""
    return audit_line.get("changed_epoch", audit_line["epoch"])


def run_scenario(name: str, args: argparse.Namespace, directory: Path) -> dict:
    """One run of one configuration into `directory`; returns the daemon's figures (if any)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    processes: list[subprocess.Popen] = []

    def start(argv, **kwargs) -> subprocess.Popen:
        # Children do not inherit the orchestrator's CPU: each is placed explicitly or runs anywhere.
        # They share one session, so with autogroup on they compete as plain tasks (see SCHEDULING).
        kwargs.setdefault("preexec_fn", on_all_cpus)
        proc = subprocess.Popen(argv, **kwargs)
        processes.append(proc)
        return proc

    listener = None
    daemon = None
    result: dict = {"run": name}
    try:
        server = start(server_argv(args), stdout=subprocess.PIPE, text=True)
        port = int(server.stdout.readline().split("port=")[1])
        start_at = time.time() + args.warmup
        sidecar_argv = workload_sidecar_argv(args, directory, start_at)
        if name == "detection":
            sidecar_argv.append("--fork-per-burst")
        sidecar = start(sidecar_argv, stdout=subprocess.PIPE, text=True)
        sidecar.stdout.readline()
        if name == "hand-fix":
            # The story's fix, done by hand before anything happens: later threads inherit it.
            for tid in os.listdir(f"/proc/{sidecar.pid}/task"):
                os.sched_setaffinity(int(tid), {OTHER_CPU})
                os.setpriority(os.PRIO_PROCESS, int(tid), 10)
        duration = args.detection_duration if name == "detection" else args.duration
        client = start(loadgen_argv(args, port, duration, directory, start_at), stdout=subprocess.PIPE, text=True)
        client.stdout.readline()
        start([REMEDIATOR, "record", "--pid", str(server.pid), "--pid", str(client.pid), "-i", "0.25",
               "-o", str(directory / "samples.jsonl")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
              preexec_fn=on_cpu(OTHER_CPU))
        if name in ("dry-run", "live", "detection"):
            mode = "dry-run" if name == "dry-run" else "live"
            config = write_config(directory, [server.pid, client.pid], mode, args.tick_ms)
            listener = NotifyListener(directory / "notify.sock")
            launched = time.monotonic()
            daemon = start([REMEDIATOR] + (["-v"] if name == "detection" else []) + ["run", "--config", str(config)], stdout=open(directory / "daemon.log", "w"),
                           stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": str(listener.path)})
        time.sleep(max(0.0, start_at - time.time()))
        if daemon is not None:
            if daemon.poll() is not None:
                raise RuntimeError(f"{name}: the daemon exited early: {(directory / 'daemon.log').read_text()[-2000:]}")
            ticks_at_start = cpu_ticks(daemon.pid)
        load_started = time.monotonic()
        client.wait(timeout=duration + 120)
        load_seconds = time.monotonic() - load_started
        if daemon is not None:
            hz = os.sysconf("SC_CLK_TCK")
            result["daemon_cpu_percent"] = round(100.0 * (cpu_ticks(daemon.pid) - ticks_at_start) / hz / load_seconds, 2)
            result["daemon_peak_rss_mb"] = round(peak_rss_kb(daemon.pid) / 1024, 1)
            ready = listener.first(lambda m: m.startswith("READY=1"))
            first_sample = listener.first(lambda m: "protected p99" in m)
            result["start_to_ready_s"] = None if ready is None else round(ready - launched, 2)
            result["start_to_first_sample_s"] = None if first_sample is None else round(first_sample - launched, 2)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    finally:
        for proc in reversed(processes):
            stop_tree(proc)
        if listener is not None:
            listener.close()
    return result


def read_run(directory: Path) -> dict:
    """What one run left in its directory: latencies, bursts, protected waits, decisions."""
    lines = [line.split() for line in (directory / "latency.txt").read_text().splitlines()]
    sent_at = [float(when) for when, _ in lines]
    load_start, load_end = sent_at[0], sent_at[-1]
    # onset, pid, and (with a process per burst) the CPU cgroup it was born in; those under load
    bursts = [(float(fields[0]), int(fields[1]), fields[2] if len(fields) > 2 else "")
              for fields in (line.split() for line in (directory / "bursts.txt").read_text().splitlines())]
    bursts = [burst for burst in bursts if load_start <= burst[0] <= load_end]
    counts: dict[int, int] = {}
    for sample in read_samples(directory / "samples.jsonl"):
        if load_start <= sample.ts <= load_end:
            for slot, count in sample.protected.histogram or ():
                counts[slot] = counts.get(slot, 0) + count
    audit = []
    if (directory / "audit.jsonl").exists():
        audit = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines() if line.strip()]
    return {
        "load_start": load_start,
        "sent_at": sent_at,
        "latency_ms": [float(latency) for _, latency in lines],
        "bursts": [(when, pid) for when, pid, _ in bursts],
        # bursts whose process was born in a group of remediator's: a step on its parent came first
        "born_placed": {pid for _, pid, cgroup in bursts if "/" + CGROUP_PREFIX in cgroup},
        "counts": counts,
        "acts": [line for line in audit if line.get("decision") == "act"],
    }


def analyse(name: str, rounds: list[dict], daemon: list[dict]) -> dict:
    """One configuration's figures over all its rounds pooled together."""
    latency_ms = [value for run in rounds for value in run["latency_ms"]]
    counts: dict[int, int] = {}
    for run in rounds:
        for slot, count in run["counts"].items():
            counts[slot] = counts.get(slot, 0) + count
    runq_p99 = histogram.percentile(counts, 99)
    acts = [act for run in rounds for act in run["acts"]]
    changes = [line for line in acts if line.get("outcome") in ("applied", "would-apply")]
    first = rounds[0]
    result = {
        "rounds": len(rounds),
        "requests": len(latency_ms),
        **latency_figures(latency_ms),
        "runq_p99_us": None if runq_p99 is None else round(runq_p99 / 1000, 1),
        "bursts": sum(len(run["bursts"]) for run in rounds),
        "changes": len(changes),
        # the first round drawn in the picture
        "actions": [{"t": round(in_place_at(line) - first["load_start"], 3), "step": line.get("step", {}).get("action"),
                     "outcome": line.get("outcome"), "pid": line["process"]["pid"]} for line in first["acts"]],
        "series": {"t": [round(t - first["load_start"], 4) for t in first["sent_at"]], "latency_ms": first["latency_ms"],
                   "bursts": [round(when - first["load_start"], 3) for when, _ in first["bursts"]]},
    }
    if daemon:
        result["daemon_cpu_percent"] = max(d["daemon_cpu_percent"] for d in daemon)
        result["daemon_peak_rss_mb"] = max(d["daemon_peak_rss_mb"] for d in daemon)
        starts = [d["start_to_first_sample_s"] for d in daemon if d.get("start_to_first_sample_s") is not None]
        result["start_to_first_sample_s"] = round(statistics.median(starts), 2) if starts else None
    if name == "detection":
        latencies, missed, born_placed = [], 0, 0
        for run in rounds:
            for when, pid in run["bursts"]:
                acted = [in_place_at(line) for line in run["acts"] if line["process"]["pid"] == pid and line.get("outcome") == "applied"]
                if acted:
                    latencies.append(min(acted) - when)
                elif pid in run["born_placed"]:
                    born_placed += 1  # nothing to detect: a step on its parent placed it from birth
                else:
                    missed += 1
        result["detection_s"] = [round(v, 3) for v in latencies]
        # Why a burst was missed, when an act was decided and not carried out: its outcome and first message.
        result["acts_not_applied"] = {}
        for line in acts:
            if line.get("outcome") != "applied":
                result["acts_not_applied"].setdefault(line.get("outcome"), [0, str(line.get("message", ""))[:200]])[0] += 1
        result["detection_missed"] = missed
        result["detection_born_placed"] = born_placed
        result["detection_median_s"] = round(statistics.median(latencies), 3) if latencies else None
        result["detection_p95_s"] = round(percentile(latencies, 95), 3) if latencies else None
    return result


def verdicts(runs: dict[str, dict]) -> list[tuple[str, str, str, bool]]:
    """The targets the runs given can judge (each row needs its runs)."""
    none, dry, live, fix, det = (runs.get(k) for k in ("none", "dry-run", "live", "hand-fix", "detection"))
    rows = []
    if none and live:
        ratio = none["p99_ms"] / live["p99_ms"]
        rows.append(("live p99 better than none", f"{ratio:.1f}x", f">= {TARGETS['live_vs_none_p99']}x", ratio >= TARGETS["live_vs_none_p99"]))
    if live and fix:
        for figure, key, target in (("p99", "p99_ms", "live_vs_hand_fix_p99"), ("p99.9", "p999_ms", "live_vs_hand_fix_p999"),
                                    ("max", "max_ms", "live_vs_hand_fix_max")):
            ratio = live[key] / fix[key]
            rows.append((f"live {figure} vs hand fix", f"{ratio:.2f}x ({live[key]} vs {fix[key]} ms)", f"<= {TARGETS[target]}x",
                         ratio <= TARGETS[target]))
    if det:
        median, p95 = det.get("detection_median_s"), det.get("detection_p95_s")
        placed = det.get("detection_born_placed")
        rows.append(("detection to action, median", f"{median} s over {len(det.get('detection_s', []))} bursts "
                     f"({det.get('detection_missed')} missed"
                     + (f", {placed} born in remediator's group after a step on their parent" if placed else "") + ")", f"<= {TARGETS['detection_median_s']} s, none missed",
                     median is not None and median <= TARGETS["detection_median_s"] and not det.get("detection_missed")))
        rows.append(("detection to action, p95", f"{p95} s", f"<= {TARGETS['detection_p95_s']} s", p95 is not None and p95 <= TARGETS["detection_p95_s"]))
        if live:
            ratio = det["p99_ms"] / live["p99_ms"]
            rows.append(("detection-run p99 vs live", f"{ratio:.2f}x", f"<= {TARGETS['detection_vs_live_p99']}x",
                         ratio <= TARGETS["detection_vs_live_p99"]))
    if dry and none:
        ratio = dry["p99_ms"] / none["p99_ms"]
        rows.append(("dry-run p99 vs none", f"{ratio:.2f}x", f"<= {TARGETS['dry_run_vs_none_p99']}x", ratio <= TARGETS["dry_run_vs_none_p99"]))
    daemons = [run["daemon_cpu_percent"] for run in (dry, live, det) if run and "daemon_cpu_percent" in run]
    if daemons:
        worst = max(daemons)
        rows.append(("daemon CPU (worst run)", f"{worst:.2f}% of one core", f"<= {TARGETS['daemon_cpu_percent']}%", worst <= TARGETS["daemon_cpu_percent"]))
    return rows


def markdown(runs: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Load {args.rate:g} req/s (Poisson, seed {args.seed}) for {args.duration:g} s per configuration"
        + (f" in each of {args.rounds} interleaved rounds (pooled)" if args.rounds > 1 else "")
        + "; server work "
        f"{args.work_us:g} us per request on CPU {REQUEST_CPU}; sidecar fluent-bit: {args.threads} zlib threads, "
        f"{args.burst_ms:g} ms bursts every {args.period_ms / 1000:g} s (+0-{args.jitter_ms:g} ms, seeded); "
        f"tick {args.tick_ms:g} ms; the shipped policies; server, client and sidecar compete as plain tasks (one session).",
        "",
        "| run | requests | p50 ms | p99 ms | p99.9 ms | max ms | protected run-queue p99 µs | changes | daemon CPU % | peak RSS MB | start to first sample s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("none", "dry-run", "live", "hand-fix", "detection"):
        run = runs.get(name)
        if run is None:
            continue
        lines.append(
            f"| {name} | {run['requests']} | {run['p50_ms']} | {run['p99_ms']} | {run['p999_ms']} | {run['max_ms']} | "
            f"{run['runq_p99_us']} | {run['changes']} | {run.get('daemon_cpu_percent', '-')} | {run.get('daemon_peak_rss_mb', '-')} | "
            f"{run.get('start_to_first_sample_s', '-')} |"
        )
    lines += ["", "| target | measured | wanted | |", "|---|---|---|---|"]
    for what, measured, wanted, met in verdicts(runs):
        lines.append(f"| {what} | {measured} | {wanted} | {'met' if met else '**missed**'} |")
    for outcome, (count, message) in (runs.get("detection") or {}).get("acts_not_applied", {}).items():
        lines.append(f"\nDetection run: {count} act decision(s) {outcome}, the first: {message}")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True, sharey=True)
    for axis, name, title in ((axes[0], "none", "no remediator"), (axes[1], "live", "remediator live (shipped policies)")):
        run = runs[name]
        series = run["series"]
        for onset in series["bursts"]:
            axis.axvspan(onset, onset + run_burst_s, color="orange", alpha=0.25, lw=0)
        axis.scatter(series["t"], series["latency_ms"], s=1.5, color="tab:blue", alpha=0.5, rasterized=True)
        for action in run["actions"]:
            axis.axvline(action["t"], color="tab:red", lw=1.2)
            axis.annotate(action["step"] or "", (action["t"], 0.95), xycoords=("data", "axes fraction"),
                          rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
        axis.set_yscale("log")
        axis.set_ylabel("request latency (ms)")
        axis.set_title(f"{title}: p99 {run['p99_ms']} ms, p99.9 {run['p999_ms']} ms")
    axes[1].set_xlabel("seconds since the load started (orange: sidecar bursts; red: remediator's actions)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


run_burst_s = 0.4


def interrupted(signum, frame) -> None:
    """SIGTERM as Ctrl-C: each run's cleanup (its processes killed, the daemon's changes restored) runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    global run_burst_s
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load per configuration and round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the compared configurations, interleaved and pooled (each live round starts "
                        "from a fresh sidecar, so it pays the daemon's learning again)")
    parser.add_argument("--detection-duration", type=float, default=40.0, help="seconds of the detection run")
    add_workload_arguments(parser)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds for everything (and the daemon) to start")
    parser.add_argument("--tick-ms", type=float, default=250.0,
                        help="the daemon's tick (the shipped 250 ms); a `within` trigger fires off the tick whatever it is")
    parser.add_argument("--out", default=str(HERE / "out" / "incident"))
    parser.add_argument("--runs", default="none,dry-run,live,hand-fix,detection")
    parser.add_argument("--publish", action="store_true", help="copy the table and the picture to docs/")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    run_burst_s = args.burst_ms / 1000
    if os.geteuid() != 0:
        print("incident: run as root (sudo ./bootstrap bench incident)", file=sys.stderr)
        return 1
    if sorted(os.sched_getaffinity(0)) != [0, 1] and len(os.sched_getaffinity(0)) < 2:
        print("incident: needs two CPUs", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {OTHER_CPU})  # the orchestrator stays off the request CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.runs.split(",")
    compared = [name for name in names if name != "detection"]
    collected: dict[str, list[dict]] = {name: [] for name in names}
    daemon_figures: dict[str, list[dict]] = {name: [] for name in names}
    # The compared configurations take turns, round after round, in a rotating order, so drift on
    # this shared machine falls on all of them alike; each one's requests are pooled over rounds.
    for round_index in range(args.rounds):
        order = compared[round_index % max(1, len(compared)):] + compared[: round_index % max(1, len(compared))]
        for name in order:
            directory = out / name / f"round-{round_index + 1}"
            print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            daemon_figures[name].append(run_scenario(name, args, directory))
            collected[name].append(read_run(directory))
            latencies = collected[name][-1]["latency_ms"]
            print(f"  p99 {percentile(latencies, 99):.2f} ms over {len(latencies)} requests", file=sys.stderr, flush=True)
    if "detection" in names:
        print("detection ...", file=sys.stderr, flush=True)
        daemon_figures["detection"].append(run_scenario("detection", args, out / "detection"))
        collected["detection"].append(read_run(out / "detection"))
    runs = {name: analyse(name, collected[name], [d for d in daemon_figures[name] if d.get("daemon_cpu_percent") is not None])
            for name in names if collected[name]}
    (out.parent / "incident.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    table = markdown(runs, args)
    print(table)
    if set(runs) >= {"none", "dry-run", "live", "hand-fix", "detection"}:
        (out.parent / "incident.md").write_text(table)
        plot(runs, out.parent / "incident.png")
        if args.publish:
            docs = ROOT / "docs"
            shutil.copy(out.parent / "incident.md", docs / "incident.md")
            shutil.copy(out.parent / "incident.png", docs / "incident.png")
            print(f"published to {docs}/incident.md and incident.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:
        print(f"incident: interrupted ({stop}); the run's processes were stopped and the daemon's changes given back",
              file=sys.stderr)
        sys.exit(130)
