"""`remediator record` writes Samples to a file; `remediator replay` runs policies over them.

Replay is the engine exactly as the daemon runs it, fed from a recording instead of the kernel,
with every change assumed to succeed: what these policies would have done, tick by tick. It needs
no root and no BPF, so a policy change can be reviewed against last night's incident on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..audit import AuditWriter, format_table
from ..config import load_config
from ..cpulist import CpuListError, format_cpulist, parse_cpulist
from ..errors import RemediatorError
from ..metrics import DEFAULT_OFFENDER_LABELS, Metrics, write_text
from ..policy import load_policies
from ..sample import read_samples, write_samples
from ..tick import Observers, engine_settings, replay_samples
from .common import add_selector_arguments, add_source_arguments, interval_samples, open_collector, positive_float

RECORD_EXAMPLES = """\
examples:
  sudo remediator record --unit api.service -o incident.jsonl            until Ctrl-C, one sample a second
  sudo remediator record --comm nginx -i 0.25 -c 2400 -o ten-minutes.jsonl
"""

REPLAY_EXAMPLES = """\
examples:
  remediator replay incident.jsonl --policies policies/                  what the shipped policies would do
  remediator replay incident.jsonl --config /etc/remediator/remediator.toml
  remediator replay incident.jsonl --policies my-change.toml --request-cpus 0-3 --json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    record = subparsers.add_parser(
        "record",
        help="record samples (run-queue tail, CPU, blame) to a file for replay",
        description="Write one Sample per interval as a JSON line: the input of 'remediator replay' and of tests.",
        epilog=RECORD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_selector_arguments(record)
    record.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (JSON lines; '-' = stdout)")
    record.add_argument("-i", "--interval", type=positive_float, default=1.0, metavar="S", help="seconds per sample (default 1)")
    record.add_argument("-c", "--count", type=int, default=None, metavar="N", help="stop after N samples")
    add_source_arguments(record)
    record.set_defaults(handler=run_record)

    replay = subparsers.add_parser(
        "replay",
        help="run policies over recorded samples and show what they would have done",
        description="Feed a recording through the engine with the given policies; every change is assumed to succeed.",
        epilog=REPLAY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("recording", help="a file written by 'remediator record'")
    replay.add_argument("--policies", action="append", default=[], metavar="PATH", help="policy files or directories")
    replay.add_argument("--config", metavar="FILE", help="take policies, request CPUs and limits from a daemon config")
    replay.add_argument("--request-cpus", metavar="LIST", help="CPUs the request path owned (default: the config's, else CPU 0)")
    replay.add_argument("--cpus", metavar="LIST", help="online CPUs of the recorded host (default: 0..ncpus-1 from the recording)")
    replay.add_argument("--json", action="store_true", help="one audit-style JSON line per decision")
    replay.add_argument("--metrics", metavar="FILE", help="write the Prometheus metrics the daemon would have exported "
                        "after the recording (text format; '-' = stdout)")
    replay.set_defaults(handler=run_replay)


def run_record(args: argparse.Namespace) -> int:
    collector, note = open_collector(args)
    print(note, file=sys.stderr)
    stream = sys.stdout if args.output == "-" else open(args.output, "w")
    written = 0
    try:
        for sample in interval_samples(collector, args.interval, args.count):
            write_samples(stream, [sample])
            written += 1
    except KeyboardInterrupt:
        pass
    finally:
        collector.close()
        if stream is not sys.stdout:
            stream.close()
        print(f"recorded {written} samples to {args.output}", file=sys.stderr)
    return 0


def _cpus(text: str, what: str) -> frozenset[int]:
    try:
        return parse_cpulist(text)
    except CpuListError as exc:
        raise RemediatorError(f"{what}: {exc}") from None


def recorded_tick_s(samples: list) -> float:
    durations = sorted(sample.duration_s for sample in samples)
    return durations[len(durations) // 2]


def run_replay(args: argparse.Namespace) -> int:
    samples = list(read_samples(args.recording))
    if not samples:
        raise RemediatorError(f"{args.recording}: no samples")
    config = load_config(args.config) if args.config else None
    paths = args.policies or (list(config.policy_paths) if config else [])
    if not paths:
        raise RemediatorError("say which policies to replay: --policies PATH or --config FILE")
    policies = load_policies(paths)
    online = _cpus(args.cpus, "--cpus") if args.cpus else frozenset(range(samples[0].ncpus))
    if args.request_cpus:
        request = _cpus(args.request_cpus, "--request-cpus")
    elif config and config.request_cpus is not None:
        request = config.request_cpus
    else:
        request = frozenset({0})
        print("replay: request CPUs not given (--request-cpus or the config's): assuming CPU 0", file=sys.stderr)
    # The tick the daemon ran: its config's, else the recording's (the engine keeps history by it).
    tick_s = config.tick_s if config else recorded_tick_s(samples)
    settings = engine_settings(policies, tick_s, request, online, config.max_changes_per_minute if config else 10,
                               self_pid=-1)  # nothing in a recording is this replay
    records: list[dict] = []
    observers = Observers([AuditWriter(records.append)])
    metrics = None
    if args.metrics:
        metrics = Metrics(offender_labels=config.metrics.offender_labels if config and config.metrics else DEFAULT_OFFENDER_LABELS)
        observers.members.append(metrics)
    replay_samples(samples, policies, settings, observers)
    if metrics is not None:
        write_text(metrics, args.metrics)
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    span = (samples[-1].end_ns - samples[0].start_ns) / 1e9
    print(f"{len(samples)} samples over {span:.1f} s from {os.path.basename(args.recording)}; "
          f"{len(policies.policies)} policies; request CPUs {format_cpulist(request)} of {format_cpulist(online)}")
    print(format_table(records) if records else "no decisions: these policies would not have acted")
    return 0
