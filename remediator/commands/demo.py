"""`remediator demo`: see remediator work on this host in about a minute (see demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import positive_float

EXAMPLES = """\
examples:
  sudo ./bootstrap demo                          set up, then this
  sudo remediator demo                           about a minute; prints the report's path at the end
  sudo remediator demo --duration 90

It starts a small service on CPU 0 and a bursting sidecar named fluent-bit, runs the daemon live on
the shipped policies (its own config, journal and audit log in a temporary directory), shows the
live view, then gives every change back, stops what it started and draws the report. Ctrl-C at any
point stops everything and leaves nothing behind.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="see it work in a minute: a service, a noisy sidecar, the daemon live, then a report",
        description="Start a small service and a bursting log-shipper-like sidecar, let the daemon tame it, and report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=positive_float, default=45.0, metavar="S",
                        help="seconds the daemon watches once the sidecar is started (default 45)")
    parser.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)  # where the temp directory goes (tests)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args.duration, args.dir)
