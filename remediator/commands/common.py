"""Arguments and set-up shared by the commands that watch the scheduler (watch, record)."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable, Iterator

from ..collector import Collector
from ..errors import RemediatorError
from ..hostcheck import kernel_headers_description
from ..schedgroups import SchedGroups
from ..probes import ProbeSettings, window_shift_for
from ..procfs import ProcFS
from ..sample import Sample, merge_samples
from ..selectors import ProtectSelectors
from ..sources import open_source

log = logging.getLogger(__name__)

# The probes' window ring holds 16 windows; reading at least once a second keeps every window.
MAX_READ_INTERVAL_S = 1.0


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def add_selector_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to protect (repeatable; a process matching any is protected)")
    group.add_argument("--pid", type=int, action="append", default=[], metavar="N", help="a process id")
    group.add_argument("--comm", action="append", default=[], metavar="GLOB", help="a comm glob (15 characters)")
    group.add_argument("--cgroup", action="append", default=[], metavar="PATH", help="a cgroup path (and below)")
    group.add_argument("--unit", action="append", default=[], metavar="NAME", help="a systemd unit (via its cgroup)")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=("auto", "bpf", "procfs"),
        default="auto",
        help="where the numbers come from (default: bpf, falling back to procfs when BPF cannot load)",
    )
    parser.add_argument(
        "--window",
        type=positive_float,
        default=134.0,
        metavar="MS",
        help="length of the sub-interval windows behind burst peaks, rounded to a power of two "
        "nanoseconds (default 134 ms = 2^27 ns)",
    )
    parser.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)


def selectors_from_args(args: argparse.Namespace) -> ProtectSelectors:
    selectors = ProtectSelectors.build(pids=args.pid, comms=args.comm, cgroups=args.cgroup, units=args.unit)
    if selectors.empty:
        raise RemediatorError("say what to protect: --pid, --comm, --cgroup or --unit (see --help)")
    return selectors


def open_collector(args: argparse.Namespace) -> tuple[Collector, str]:
    """A started collector, and a one-line note on the source in use."""
    procfs = ProcFS(args.proc_root)
    settings = ProbeSettings(window_shift=window_shift_for(args.window))
    source, fallback_reason = open_source(procfs, want=args.source, settings=settings)
    if fallback_reason:
        note = f"source procfs (eBPF not used: {fallback_reason})"
        log.warning("eBPF probes not loaded (%s): falling back to procfs, which has no tail and no blame", fallback_reason)
    elif source.name == "procfs":
        note = "source procfs (as requested: no tail, no blame)"
    else:
        note = f"source bpf (kernel headers: {kernel_headers_description()})"
    # Scheduling groups in the samples, so a replay judges nice and sched steps as live would.
    collector = Collector(source, selectors_from_args(args), procfs, sched_groups=SchedGroups.for_host(procfs))
    try:
        collector.start()
    except BaseException:
        collector.close()
        raise
    return collector, note


def interval_samples(
    collector: Collector, interval_s: float, count: int | None, sleep: Callable[[float], None] = time.sleep
) -> Iterator[Sample]:
    """One merged sample per interval; reads at least once a second underneath."""
    reads_per_interval = max(1, round(interval_s / MAX_READ_INTERVAL_S))
    read_every = interval_s / reads_per_interval
    produced = 0
    next_read = time.monotonic()
    while count is None or produced < count:
        parts = []
        for _ in range(reads_per_interval):
            next_read += read_every
            delay = next_read - time.monotonic()
            if delay > 0:
                sleep(delay)
            parts.append(collector.sample())
        yield merge_samples(parts)
        produced += 1
