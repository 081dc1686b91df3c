"""`remediator audit`: the audit log as a readable table."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from ..audit import format_table, read_audit

DEFAULT_AUDIT = "/var/log/remediator/audit.jsonl"

EXAMPLES = """\
examples:
  remediator audit                                   the default log (/var/log/remediator/audit.jsonl)
  remediator audit /tmp/audit.jsonl --last 20        the last 20 decisions
  remediator audit --decision act --decision verify  actions and their verifications only
  remediator audit --pid 2621 --json                 one process's history, as JSON lines
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="print the audit log as a table",
        description="Show what the daemon decided, why, what it changed (or would have), and whether it helped.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", nargs="?", default=DEFAULT_AUDIT, help=f"the audit log (default {DEFAULT_AUDIT})")
    parser.add_argument("--last", type=int, default=None, metavar="N", help="only the last N lines")
    parser.add_argument("--decision", action="append", default=[], help="only these decision kinds (act, verify, revert, ...)")
    parser.add_argument("--pid", type=int, default=None, help="only this process")
    parser.add_argument("--json", action="store_true", help="print the selected lines as JSON")
    parser.set_defaults(handler=show_audit)


def show_audit(args: argparse.Namespace) -> int:
    records = list(read_audit(args.file))
    if args.decision:
        records = [r for r in records if r.get("decision") in args.decision]
    if args.pid is not None:
        records = [r for r in records if (r.get("process") or {}).get("pid") == args.pid]
    if args.last is not None:
        records = records[-args.last :]
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    if not records:
        print(f"no decisions in {args.file}")
        return 0
    width = shutil.get_terminal_size((0, 0)).columns if sys.stdout.isatty() else 0
    print(format_table(records, width))
    return 0
