"""`remediator report`: draw an incident from the audit log and a recording (see report.py)."""

from __future__ import annotations

import argparse

from ..config import load_config
from ..incident import load_scene, parse_when
from ..report import build, write_report

EXAMPLES = """\
examples:
  remediator report --config /etc/remediator/remediator.toml --since 2h -o incident
  remediator report --audit audit.jsonl --recording recording.jsonl --since 2026-12-06T07:00 --until 2026-12-06T07:30 -o night
Writes OUTPUT.png and OUTPUT.html (self-contained: the picture inline and the table of decisions).
A recording's older half (FILE.1, from the daemon's rolling recording) is read first when it exists.
Times: a duration ago (30m, 2h), an epoch, or ISO 8601 (UTC unless it says otherwise).
"""


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """--since/--until/--audit/--recording/--config: the inputs of report and policy suggest."""
    parser.add_argument("--since", metavar="T", help="from this time (30m = 30 minutes ago, an epoch, or ISO 8601)")
    parser.add_argument("--until", metavar="T", help="up to this time (same forms)")
    parser.add_argument("--audit", metavar="FILE", help="the audit log (default: the config's audit_log)")
    parser.add_argument("--recording", metavar="FILE", help="samples from 'remediator record' or the daemon's [recording] "
                        "(default: the config's [recording] path)")
    parser.add_argument("--config", metavar="FILE", help="take the audit log and recording paths from a daemon config")


def scene_from_args(args: argparse.Namespace):
    config = load_config(args.config) if args.config else None
    audit = args.audit or (config.audit_path if config else None)
    recording = args.recording or (config.recording_path if config else None)
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until) if args.until else None
    return load_scene(audit, recording, since, until)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="draw an incident: the protected tail over time, the blame, every action and revert (PNG + HTML)",
        description="Draw what happened from the audit log and a recording: a PNG and a self-contained HTML page.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scene_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="writes OUTPUT.png and OUTPUT.html")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="blamed processes shown (default 5)")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    png, page = write_report(build(scene_from_args(args), args.top), args.output)
    print(f"wrote {png} and {page}")
    return 0
