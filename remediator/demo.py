"""`remediator demo`: the whole story on this host in about a minute, leaving nothing behind.

A small service (bench/workloads/server.py on CPU 0, with its load generator, both protected) and a
sidecar named like a log shipper (bench/workloads/sidecar.py as `fluent-bit`: idle, then two
threads compressing flat out for 600 ms every 4 s) run beside the daemon, live, on the shipped
policies, with its own config, journal, audit log and recording in a fresh temporary directory. The
live view (view.py) is drawn from the daemon's recording as it is written, and its decisions from
its audit log; at the end the daemon is stopped (it gives every change back: revert_on_exit), the
workloads are stopped, and `remediator report` draws what happened.

Nothing else on the host changes. Every process the demo starts is in a session of its own and gets
SIGKILL (the daemon SIGTERM, so it restores first) if the demo itself dies (PR_SET_PDEATHSIG).
Ctrl-C at any point stops everything the same way and removes the temporary directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

from .errors import RemediatorError
from .printable import printable
from .sample import Sample, merge_samples
from .view import interval_view, render_text

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ROOT / "bench" / "workloads"
SHIPPED_POLICIES = ROOT / "policies"
REQUEST_CPU = 0
PR_SET_PDEATHSIG = 1
SIDECAR_COMM = "fluent-bit"
FIRST_BURST_S = 5.0  # a calm start first, so the tail's climb shows
CGROUP_ROOT = Path("/sys/fs/cgroup")


def remediator_cgroups() -> set[Path]:
    """The cgroups remediator creates (named remediator*), in every hierarchy: the demo checks it
    leaves none it did not find."""
    found = set()
    for pattern in ("remediator*", "*/remediator*", "*/*/remediator*"):
        found |= {path for path in CGROUP_ROOT.glob(pattern) if path.is_dir()}
    return found


def _die_with_parent(sig: int) -> Callable[[], None]:
    def prepare() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))  # not the demo's own CPU
    return prepare


def demo_config(directory: Path, protect: list[int]) -> str:
    return f"""# written by 'remediator demo': this run only, in its own directory
[protect]
pids = {protect}
request_cpus = "{REQUEST_CPU}"
[daemon]
mode = "live"
source = "bpf"
tick = "250ms"
policies = [{json.dumps(str(SHIPPED_POLICIES))}]
journal = {json.dumps(str(directory / "journal.jsonl"))}
audit_log = {json.dumps(str(directory / "audit.jsonl"))}
on_start = "restore"
revert_on_exit = true
[limits]
max_changes_per_minute = 10
[recording]
path = {json.dumps(str(directory / "recording.jsonl"))}
max_bytes = 67108864
"""


SPARK = " ▁▂▃▄▅▆▇█"
SPARK_FLOOR_US, SPARK_CEILING_US = 30.0, 8000.0  # log scale: the quiet tail to four times the threshold


def sparkline(values: list[float | None]) -> str:
    """One character per value on a log scale; 2 ms (the shipped threshold) is SPARK[-3]."""
    import math

    marks = []
    span = math.log(SPARK_CEILING_US / SPARK_FLOOR_US)
    for value in values:
        if value is None:
            marks.append("?")
            continue
        position = math.log(max(SPARK_FLOOR_US, min(SPARK_CEILING_US, value)) / SPARK_FLOOR_US) / span
        marks.append(SPARK[1 + round(position * (len(SPARK) - 2))])
    return "".join(marks)


class Follower:
    """New complete lines of a file another process appends to."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete if line.strip()]


def describe_decision(record: dict) -> str | None:
    """One line for a decision worth telling (an action, a revert, a skipped step, a verdict, a give-back)."""
    kind = record.get("decision")
    process = record.get("process") or {}
    who = f"{process.get('comm', '?')} (pid {process.get('pid')})"
    policy = (record.get("policy") or {}).get("name", "")
    if kind == "act":
        return f">>> ACT   {policy}: {(record.get('step') or {}).get('action')} on {who}: {record.get('change', '')} " \
               f"[{record.get('outcome')}]"
    if kind == "revert":
        return f"<<< REVERT {policy} on {who}: {record.get('change', '')} [{record.get('outcome')}]"
    if kind == "skipped":
        return f"--- SKIP  {policy}: {(record.get('step') or {}).get('action')} on {who}: {record.get('message', '')}"
    if kind == "verify":
        evidence = record.get("evidence") or {}
        return (f"... VERIFY {policy} on {who}: {evidence.get('verdict')} (p{evidence.get('percentile', 99):g} "
                f"{evidence.get('before_tail_us')} -> {evidence.get('after_tail_us')} us)")
    if kind in ("exit", "maintain") and record.get("outcome") not in (None, "unchanged"):
        return f"<<< GIVEN BACK ({kind}) pid {process.get('pid')}: {record.get('change', '')} [{record.get('outcome')}]"
    return None


class CtrlC:
    """The demo's SIGINT handler: KeyboardInterrupt, and a flag the demo's loops look at. The
    exception alone can be lost: a Ctrl-C that lands while subprocess forks a workload is raised
    in an at-fork callback, where Python reports it and drops it, and the demo would run on to
    its end."""

    def __init__(self):
        self.pressed = False

    def __call__(self, _signum, _frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt


class Demo:
    def __init__(self, directory: Path, duration_s: float, out: TextIO = sys.stdout, ctrl_c: CtrlC | None = None):
        self.directory = directory
        self.ctrl_c = ctrl_c or CtrlC()
        self.duration_s = duration_s
        self.out = out
        self.tty = out.isatty()
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.daemon: subprocess.Popen | None = None
        self.told: list[str] = []
        self.story: list[str] = []
        self.history: list[float | None] = []
        self.cgroups_before = remediator_cgroups()
        self.workload_log = (directory / "workloads.log").open("w")  # their stderr: not mixed into the story

    def say(self, text: str) -> None:
        print(printable(text), file=self.out, flush=True)

    def narrate(self, text: str) -> None:
        """A step of the story: said now, and kept at the top of the redrawn view."""
        self.story.append(printable(text))
        self.say(text)

    def stop_if_interrupted(self) -> None:
        """Raise the Ctrl-C that an at-fork callback swallowed (see CtrlC)."""
        if self.ctrl_c.pressed:
            raise KeyboardInterrupt

    def start(self, name: str, argv: list[str], sig: int = signal.SIGKILL, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stderr", self.workload_log)
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent(sig), **kwargs)
        self.children.append((name, proc))
        self.stop_if_interrupted()
        return proc

    def ready_line(self, proc: subprocess.Popen, name: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.stop_if_interrupted()
            line = proc.stdout.readline()
            if line.startswith("ready"):
                return line
            if not line and proc.poll() is not None:
                break
        raise RemediatorError(f"demo: {name} did not start (exit status {proc.poll()})")

    # -- the story ------------------------------------------------------------------------------
    def run(self) -> None:
        python = sys.executable
        server = self.start("api-server", [python, str(WORKLOADS / "server.py"), "--cpu", str(REQUEST_CPU),
                                           "--work-us", "500"], stdout=subprocess.PIPE, text=True)
        port = self.ready_line(server, "api-server").split("port=")[1].split()[0]
        client = self.start("api-client", [python, str(WORKLOADS / "loadgen.py"), "--port", port, "--rate", "1300",
                                           "--duration", str(self.duration_s + 60), "--out", os.devnull,
                                           "--cpu", str(REQUEST_CPU)], stdout=subprocess.PIPE, text=True)
        self.ready_line(client, "api-client")
        self.narrate(f"started a small service: api-server (pid {server.pid}) on CPU {REQUEST_CPU}, and api-client "
                 f"(pid {client.pid}) sending it 1300 requests a second; both are protected")
        config = self.directory / "remediator.toml"
        config.write_text(demo_config(self.directory, [server.pid, client.pid]))
        log = (self.directory / "daemon.log").open("w")
        self.daemon = self.start("remediator", [python, "-m", "remediator", "run", "--config", str(config), "--live"],
                                 sig=signal.SIGTERM, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.narrate(f"started remediator live (pid {self.daemon.pid}) on the shipped policies ({SHIPPED_POLICIES}); "
                 f"its config, journal, audit log and recording are in {self.directory}")
        samples = Follower(self.directory / "recording.jsonl")
        audit = Follower(self.directory / "audit.jsonl")
        deadline = time.monotonic() + 20
        while not (self.directory / "recording.jsonl").exists():
            self.stop_if_interrupted()
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RemediatorError(f"demo: remediator did not start:\n{(self.directory / 'daemon.log').read_text()}")
            time.sleep(0.1)
        sidecar = self.start(SIDECAR_COMM, [python, str(WORKLOADS / "sidecar.py"), "--comm", SIDECAR_COMM, "--threads", "2",
                                            "--burst-ms", "600", "--period-ms", "4000",
                                            "--first-after-ms", str(int(FIRST_BURST_S * 1000)),
                                            "--bursts-out", os.devnull], stdout=subprocess.PIPE, text=True)
        self.ready_line(sidecar, SIDECAR_COMM)
        self.narrate(f"started a sidecar named {SIDECAR_COMM} (pid {sidecar.pid}): from {FIRST_BURST_S:g} s on, two threads "
                 "compress flat out for 600 ms every 4 s, on any CPU")
        self.watch(samples, audit, time.monotonic() + self.duration_s)
        self.say("time is up: stopping remediator, which gives every change back")
        self.stop_daemon()
        for line in audit.lines():
            self.tell(json.loads(line))

    def watch(self, samples: Follower, audit: Follower, until: float) -> None:
        pending: list[Sample] = []
        started = time.monotonic()
        while time.monotonic() < until:
            self.stop_if_interrupted()
            if self.daemon.poll() is not None:
                raise RemediatorError(f"demo: remediator stopped:\n{(self.directory / 'daemon.log').read_text()}")
            for line in samples.lines():
                pending.append(Sample.from_json(json.loads(line)))
            for line in audit.lines():
                self.tell(json.loads(line))
            if len(pending) >= 4:  # one frame a second: four 250 ms ticks
                try:
                    frame = merge_samples(pending)
                except ValueError:
                    frame = pending[-1]
                pending = []
                self.frame(frame, time.monotonic() - started)
            time.sleep(0.25)

    def tell(self, record: dict) -> None:
        line = describe_decision(record)
        if line:
            self.told.append(line)
            self.say(line)

    def frame(self, sample: Sample, elapsed: float) -> None:
        view = interval_view(sample, top=3)
        waits = view["protected"]
        self.history.append(waits["p99_us"])
        if self.tty:
            # The live view redrawn in place: the story so far, the tail's history, the view, the decisions.
            text = render_text(view, sample, header=f"remediator demo, {elapsed:.0f} s")
            self.out.write("\033[H\033[J" + "\n".join(self.story) + "\n\n"
                           + f"protected p99, a mark a second (threshold 2 ms = {SPARK[-3]}): {sparkline(self.history[-60:])}\n\n"
                           + text + "\n\ndecisions:\n" + "\n".join(self.told[-8:] or ["none yet"]) + "\n")
            self.out.flush()
            return
        blamed = ", ".join(f"{printable(b['comm'])} {b['share']:.0%}" for b in view["top_blame"] if not b["protected"])
        self.say(f"[{elapsed:5.1f} s] protected p99 {waits['p99_us']} us, max {waits['max_us']} us; "
                 f"most blamed: {blamed or 'nobody'}")

    # -- leaving nothing behind ------------------------------------------------------------------
    def stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()

    def cleanup(self) -> list[str]:
        """Stop the daemon (it restores), then the workloads; give back what a killed daemon left in
        its journal; say what, if anything, could not be cleaned."""
        problems = []
        self.stop_daemon()
        journal = self.directory / "journal.jsonl"
        if self.daemon is not None and self.daemon.returncode not in (0, None) and journal.exists():
            subprocess.run([sys.executable, "-m", "remediator", "revert", "--all", "--journal", str(journal)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        workloads = [proc for _, proc in self.children if proc is not self.daemon]
        for proc in reversed(workloads):  # all at once: none outlives the others to complain of a lost peer
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in workloads:
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self.workload_log.close()
        left = remediator_cgroups() - self.cgroups_before
        if left:
            problems.append("cgroups left behind: " + ", ".join(map(str, sorted(left))))
        return problems


def check_host() -> None:
    if os.geteuid() != 0:
        raise RemediatorError("the demo runs the daemon live (it changes its own sidecar's CPU share): run as root "
                              "(sudo ./bootstrap demo)")
    if len(os.sched_getaffinity(0)) < 2 or REQUEST_CPU not in os.sched_getaffinity(0):
        raise RemediatorError("the demo needs at least two CPUs, CPU 0 among them (the service gets CPU 0)")
    for needed in (WORKLOADS / "server.py", WORKLOADS / "sidecar.py", SHIPPED_POLICIES):
        if not needed.exists():
            raise RemediatorError(f"the demo runs from a checkout of remediator: {needed} is missing")
    if importlib.util.find_spec("matplotlib") is None:  # the report at the end draws with it: fail now, not in a minute
        raise RemediatorError("the demo's report needs matplotlib: sudo ./bootstrap demo installs it (Debian: python3-matplotlib)")


def run_demo(duration_s: float, keep_dir: Path | None = None, out: TextIO = sys.stdout) -> int:
    check_host()
    directory = Path(tempfile.mkdtemp(prefix="remediator-demo-", dir=keep_dir))
    own_cpus = os.sched_getaffinity(0)
    print(f"demo directory {directory}", file=out, flush=True)
    ctrl_c = CtrlC()
    usual = signal.signal(signal.SIGINT, ctrl_c)
    demo = Demo(directory, duration_s, out, ctrl_c)
    interrupted = False
    failure: RemediatorError | None = None
    try:
        os.sched_setaffinity(0, own_cpus - {REQUEST_CPU})  # the demo's own drawing stays off the service's CPU
        demo.run()
        demo.stop_if_interrupted()
    except KeyboardInterrupt:
        interrupted = True
    except RemediatorError as exc:
        failure = exc
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        try:
            problems = demo.cleanup()
        finally:
            signal.signal(signal.SIGINT, usual)
            os.sched_setaffinity(0, own_cpus)
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr)
    if interrupted or failure:
        shutil.rmtree(directory, ignore_errors=True)
        if failure:
            raise failure
        if problems:
            print("demo interrupted: every process it started is stopped, but not everything could be "
                  "cleaned (see above)", file=out)
        else:
            print("demo interrupted: every process it started is stopped and every change given back", file=out)
        return 128 + signal.SIGINT
    from .incident import load_scene
    from .report import build, write_report

    try:
        png, page = write_report(build(load_scene(directory / "audit.jsonl", directory / "recording.jsonl")),
                                 directory / "report")
    except KeyboardInterrupt:
        shutil.rmtree(directory, ignore_errors=True)  # everything was already stopped and given back
        print("demo interrupted while drawing the report: everything it started is stopped and "
              + ("every change given back" if not problems else "not everything could be cleaned (see above)"), file=out)
        return 128 + signal.SIGINT
    print(f"everything the demo started is stopped and every change given back{'' if not problems else ' (see above)'}.",
          file=out)
    print(f"report: {page}\n        {png}", file=out)
    return 1 if problems else 0
