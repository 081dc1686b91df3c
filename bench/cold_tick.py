"""Why the daemon's tick costs what it does: the same pure phases timed with warm and with cold CPU
caches, on tick inputs recorded from the daemon itself on bench/scale's synthetic host.

Between two ticks the daemon sleeps 250 ms while the host runs; its code and data leave the CPU
caches. This bench runs the daemon as shipped (in this process, dry-run, the shipped policies,
metrics on) on the scale host, records each steady tick's inputs to the delta (bpf_delta), the
engine (decide) and the metrics, stops the host, then times each phase on those inputs twice,
side by side in one run:

  warm  every input once after the other, the code and data hot in the caches
  cold  the caches flushed before each call (32 MiB written, 200,000 objects walked), as the sleep
        between ticks leaves them

and, for the metrics, one report counted in per tick (each tick touching every series, as before
2026-12-07) against the daemon's batches of FOLD_EVERY ticks. Medians of --rounds rounds.

    sudo .venv/bin/python bench/cold_tick.py                 ~2 min
    sudo .venv/bin/python bench/cold_tick.py --ticks 40 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from remediator import daemon as daemon_module  # noqa: E402
from remediator import metrics as metrics_module  # noqa: E402
from remediator import sources as sources_module  # noqa: E402
from remediator import tick as tick_module  # noqa: E402
from remediator.detector import Window  # noqa: E402
from remediator.engine import decide  # noqa: E402
from remediator.metrics import FOLD_EVERY, Metrics  # noqa: E402
from remediator.sources import bpf_delta  # noqa: E402

import scale  # noqa: E402

WARMUP_TICKS = 60


def _snapshot_copy(snapshot):
    """The probes hand over their own table, updated in place by the next read: a copy to keep."""
    return dataclasses.replace(
        snapshot,
        proc_cpu=dict(snapshot.proc_cpu),
        proc_cpu_changed=None if snapshot.proc_cpu_changed is None else dict(snapshot.proc_cpu_changed),
        cpus_of=None if snapshot.cpus_of is None else {tgid: set(cpus) for tgid, cpus in snapshot.cpus_of.items()},
    )


def record_ticks(args) -> list[dict]:
    """Each steady tick's inputs to bpf_delta, decide and the metrics, from the daemon as shipped."""
    recorded: list[dict] = []
    current: dict = {}
    ticks = [0]
    real_delta, real_decide, real_on_tick, real_tick = (sources_module.bpf_delta, tick_module.decide,
                                                        metrics_module.Metrics.on_tick, daemon_module.Daemon.tick)

    def delta(previous, snapshot, tid_to_tgid, window_ns, previous_usage=None, credits=None):
        if not current.get("recording"):
            return real_delta(previous, snapshot, tid_to_tgid, window_ns, previous_usage, credits)
        tgids: dict[int, int | None] = {}

        def remembered(tid):
            tgids[tid] = tid_to_tgid(tid)
            return tgids[tid]

        kept = (None if previous is None else _snapshot_copy(previous), _snapshot_copy(snapshot), window_ns,
                copy.deepcopy(previous_usage), copy.deepcopy(credits))
        result = real_delta(previous, snapshot, remembered, window_ns, previous_usage, credits)
        current["delta"] = kept + (tgids,)
        return result

    def deciding(state, sample, policies, settings, discovered=()):
        if current.get("recording"):
            current["decide"] = (state, sample, policies, settings, list(discovered))
        return real_decide(state, sample, policies, settings, discovered)

    def on_tick(self, report):
        if current.get("recording"):
            current["report"] = report
        return real_on_tick(self, report)

    def tick(self, *a, **k):
        current.clear()
        current["recording"] = ticks[0] >= WARMUP_TICKS
        result = real_tick(self, *a, **k)
        ticks[0] += 1
        if current.pop("recording"):
            recorded.append(dict(current))
        return result

    directory = Path(tempfile.mkdtemp(prefix="remediator-cold-tick-"))
    host, _service = scale.start_host(args, directory)
    sources_module.bpf_delta, tick_module.decide = delta, deciding
    metrics_module.Metrics.on_tick, daemon_module.Daemon.tick = on_tick, tick
    config = directory / "remediator.toml"
    config.write_text(scale.daemon_config(directory, scale.BY_COMM, "bench/cold_tick.py", args.metrics_port))
    logging.basicConfig(level=logging.ERROR)
    try:
        daemon_module.Daemon(config, max_ticks=WARMUP_TICKS + args.ticks).run()
    finally:
        sources_module.bpf_delta, tick_module.decide = real_delta, real_decide
        metrics_module.Metrics.on_tick, daemon_module.Daemon.tick = real_on_tick, real_tick
        os.killpg(host.pid, 9)
        host.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return [tick for tick in recorded if {"delta", "decide", "report"} <= tick.keys()]


class Flusher:
    """Leaves the CPU caches as a sleep beside a busy host does: cold for this process's data and code."""

    def __init__(self):
        self.junk = bytearray(32 << 20)
        self.objects = [str(index) for index in range(200_000)]

    def __call__(self) -> None:
        self.junk[::64] = bytes(len(self.junk) // 64)
        sum(len(each) for each in self.objects)


def per_tick_us(ticks: list[dict], call, flush=None) -> float:
    """Thread CPU per tick (us) of `call(tick)` over every recorded tick, the caches flushed before
    each call when `flush` is given (the flush itself not counted)."""
    total = 0
    for tick in ticks:
        if flush is not None:
            flush()
        start = time.thread_time_ns()
        call(tick)
        total += time.thread_time_ns() - start
    return total / len(ticks) / 1000


def metrics_batches_us(ticks: list[dict], flush=None) -> float:
    """The metrics as the daemon keeps them: reports kept, counted in every FOLD_EVERY ticks."""
    metrics = Metrics()
    total = 0
    for index, tick in enumerate(ticks):
        if flush is not None:
            flush()
        start = time.thread_time_ns()
        metrics.on_tick(tick["report"])
        if index == len(ticks) - 1:
            metrics.fold()
        total += time.thread_time_ns() - start
    return total / len(ticks) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1000)
    parser.add_argument("--wakeups", type=int, default=25)
    parser.add_argument("--service-threads", type=int, default=500)
    parser.add_argument("--service-wakeups", type=int, default=10)
    parser.add_argument("--ticks", type=int, default=2 * FOLD_EVERY, help="steady ticks recorded (after 60 of warm-up)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--metrics-port", type=int, default=19451)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("cold_tick: run as root (the probes)", file=sys.stderr)
        return 1
    ticks = record_ticks(args)
    if not ticks:
        print("cold_tick: no tick recorded", file=sys.stderr)
        return 1
    flush = Flusher()
    one_report_metrics = Metrics()

    def counted_each_tick(tick):
        one_report_metrics.on_tick(tick["report"])
        one_report_metrics.fold()

    phases = {
        "delta (bpf_delta)": lambda tick: bpf_delta(tick["delta"][0], tick["delta"][1], tick["delta"][5].get, *tick["delta"][2:5]),
        "engine (decide)": lambda tick: decide(*tick["decide"]),
        "  of it, the window": lambda tick: Window.from_sample(tick["decide"][1]),
        "metrics, counted in each tick": counted_each_tick,
    }
    results: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": []} for name in [*phases, "metrics, in batches"]}
    for _round in range(args.rounds):
        for name, call in phases.items():
            results[name]["warm"].append(per_tick_us(ticks, call))
            results[name]["cold"].append(per_tick_us(ticks, call, flush))
        results["metrics, in batches"]["warm"].append(metrics_batches_us(ticks))
        results["metrics, in batches"]["cold"].append(metrics_batches_us(ticks, flush))
    print(f"{len(ticks)} ticks recorded from the daemon on a host of {args.processes} processes and a "
          f"{args.service_threads}-thread service; us of thread CPU per tick, medians of {args.rounds} rounds")
    print()
    print("| phase | warm caches | cold caches | cold / warm |")
    print("|---|---|---|---|")
    for name, found in results.items():
        warm, cold = statistics.median(found["warm"]), statistics.median(found["cold"])
        print(f"| {name} | {warm:.1f} | {cold:.1f} | {cold / max(warm, 1e-9):.2f}x |")
    each = statistics.median(results["metrics, counted in each tick"]["cold"])
    batched = statistics.median(results["metrics, in batches"]["cold"])
    print()
    print(f"Metrics with cold caches: in batches of {FOLD_EVERY} {batched:.1f} us a tick against {each:.1f} counted in "
          f"each tick: **{batched / max(each, 1e-9):.2f}x**.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
