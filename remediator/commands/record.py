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

from ..audit import AuditWriter, CulpritWriter, format_table
from ..config import load_config
from ..cpulist import CpuListError, format_cpulist, parse_cpulist
from ..engine import EngineSettings
from ..errors import RemediatorError
from ..metrics import DEFAULT_OFFENDER_LABELS, Metrics, write_text
from ..model import PolicySet
from ..policy import load_policies
from ..printable import printable
from ..sample import Sample, read_samples, write_samples
from ..tick import Observers, engine_settings, replay_samples
from ..trustedfs import open_output
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
  remediator replay incident.jsonl --policies policies/ --against proposed/ --format json    a policy change, for CI
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
    replay.add_argument("--against", "--diff", dest="against", action="append", default=[], metavar="PATH",
                        help="a second set of policies: show side by side what each would have done, and where they differ")
    replay.add_argument("--format", choices=("text", "json"), default="text",
                        help="json: one audit-style JSON line per decision, or with --against one JSON document for a CI bot")
    replay.add_argument("--json", action="store_true", help="the same as --format json")
    replay.add_argument("--metrics", metavar="FILE", help="write the Prometheus metrics the daemon would have exported "
                        "after the recording (text format; '-' = stdout)")
    replay.set_defaults(handler=run_replay)


def run_record(args: argparse.Namespace) -> int:
    collector, note = open_collector(args)
    print(note, file=sys.stderr)
    stream = sys.stdout if args.output == "-" else open_output(args.output)
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


def replay_records(samples: list[Sample], policies: PolicySet, settings: EngineSettings, observers: tuple = ()) -> list[dict]:
    """What `policies` would have done on `samples`: audit-style records, every change assumed to succeed,
    and the unnamed culprits the daemon would have put on record. The daemon's tick (tick.run_tick)
    with the PretendCarrier and the daemon's audit observers: run_replay, --against and policy
    suggest's check all go through it; `observers` hear the same ticks (replay --metrics)."""
    records: list[dict] = []
    replay_samples(samples, policies, settings,
                   Observers([AuditWriter(records.append), CulpritWriter(records.append), *observers]))
    return records


def recorded_tick_s(samples: list[Sample]) -> float:
    durations = sorted(sample.duration_s for sample in samples)
    return durations[len(durations) // 2]


def replay_settings(args: argparse.Namespace, samples: list[Sample], config, policies: PolicySet) -> EngineSettings:
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
    return engine_settings(policies, tick_s, request, online, config.max_changes_per_minute if config else 10,
                           self_pid=-1)  # nothing in a recording is this replay


def run_replay(args: argparse.Namespace) -> int:
    samples = list(read_samples(args.recording))
    if not samples:
        raise RemediatorError(f"{args.recording}: no samples")
    config = load_config(args.config) if args.config else None
    paths = args.policies or (list(config.policy_paths) if config else [])
    if not paths:
        raise RemediatorError("say which policies to replay: --policies PATH or --config FILE")
    policies = load_policies(paths)
    settings = replay_settings(args, samples, config, policies)
    metrics = None
    if args.metrics:
        metrics = Metrics(offender_labels=config.metrics.offender_labels if config and config.metrics else DEFAULT_OFFENDER_LABELS)
    records = replay_records(samples, policies, settings, (metrics,) if metrics else ())
    if metrics is not None:
        write_text(metrics, args.metrics)
    output_format = "json" if args.json else args.format
    if args.against:
        other = replay_records(samples, load_policies(args.against), settings)
        return print_diff(compare(records, other), output_format, args.recording, paths, args.against)
    if output_format == "json":
        for record in records:
            print(json.dumps(record))
        return 0
    span = (samples[-1].end_ns - samples[0].start_ns) / 1e9
    print(f"{len(samples)} samples over {span:.1f} s from {os.path.basename(args.recording)}; "
          f"{len(policies.policies)} policies; request CPUs {format_cpulist(settings.request_cpus)} of "
          f"{format_cpulist(settings.online_cpus)}")
    print(format_table(records) if records else "no decisions: these policies would not have acted")
    return 0


# -- replay --against: what a policy change would change --------------------------------------------
CHANGES = ("act", "revert")  # the decisions that change a process; the rest is commentary


def change_key(record: dict) -> tuple:
    """What a change is, for comparing two replays: when, which process, which policy and step."""
    process = record.get("process") or {}
    return (record.get("epoch"), record.get("decision"), process.get("pid"), process.get("start_time"),
            (record.get("policy") or {}).get("name"), (record.get("step") or {}).get("action"))


def change_summary(record: dict) -> dict:
    process = record.get("process") or {}
    return {"ts": record.get("ts"), "epoch": record.get("epoch"), "decision": record.get("decision"),
            "policy": (record.get("policy") or {}).get("name"), "step": (record.get("step") or {}).get("action"),
            "pid": process.get("pid"), "comm": process.get("comm"), "cmdline": process.get("cmdline")}


def compare(old: list[dict], new: list[dict]) -> dict:
    """Side by side: every change of either replay, in time order, and whether both made it."""
    old_changes = {change_key(r): r for r in old if r.get("decision") in CHANGES}
    new_changes = {change_key(r): r for r in new if r.get("decision") in CHANGES}
    rows = []
    for key in sorted(old_changes.keys() | new_changes.keys(), key=lambda k: (k[0] or 0, str(k))):
        both = key in old_changes and key in new_changes
        record = old_changes.get(key) or new_changes[key]
        rows.append({**change_summary(record), "in": "both" if both else "old" if key in old_changes else "new"})
    return {
        "same": all(row["in"] == "both" for row in rows),
        "old_changes": len(old_changes),
        "new_changes": len(new_changes),
        "only_old": sum(1 for row in rows if row["in"] == "old"),
        "only_new": sum(1 for row in rows if row["in"] == "new"),
        "changes": rows,
    }


def print_diff(diff: dict, output_format: str, recording: str, old_paths, new_paths) -> int:
    """Exit 0 either way: a difference is the point of a policy change, not an error."""
    if output_format == "json":
        print(json.dumps({"recording": str(recording), "old": [str(p) for p in old_paths],
                          "new": [str(p) for p in new_paths], **diff}, indent=2))
        return 0
    print(f"{os.path.basename(str(recording))}: old {', '.join(map(str, old_paths))} ({diff['old_changes']} changes) | "
          f"new {', '.join(map(str, new_paths))} ({diff['new_changes']} changes)")
    if not diff["changes"]:
        print("neither set would have changed anything")
        return 0

    def cell(row: dict) -> str:
        return printable(f"{row['decision']} {row['policy']}: {row['step'] or 'all'} {row['comm']} ({row['pid']})")

    width = max(len(cell(row)) for row in diff["changes"])
    print(f"{'TIME (UTC)':<12}  {'OLD':<{width}}  {'NEW':<{width}}  ")
    for row in diff["changes"]:
        old = cell(row) if row["in"] in ("both", "old") else "-"
        new = cell(row) if row["in"] in ("both", "new") else "-"
        mark = "" if row["in"] == "both" else "  <- differs"
        print(f"{str(row['ts'])[11:23]:<12}  {old:<{width}}  {new:<{width}}{mark}")
    print("same changes" if diff["same"] else f"differs: {diff['only_old']} only in old, {diff['only_new']} only in new")
    return 0
