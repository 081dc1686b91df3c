"""`remediator run`: the daemon."""

from __future__ import annotations

import argparse
import logging

from ..daemon import Daemon

EXAMPLES = """\
examples:
  sudo remediator run --config /etc/remediator/remediator.toml           mode from the config
  sudo remediator run --config examples/remediator.toml --dry-run        judge this host, change nothing
  sudo remediator run --config /etc/remediator/remediator.toml --live    make the changes
  sudo remediator run --config examples/remediator.toml --source auto    run on procfs if the probes cannot load
  sudo systemctl reload remediator        (SIGHUP) reload config and policies; a bad set keeps the old one

Every decision goes to the audit log (see 'remediator audit'); every change is journaled first
(see 'remediator revert').
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the daemon: watch, decide, act (or say what it would do), verify, give back",
        description="Run the remediation loop on this host with the given config and its policies.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the daemon config (remediator.toml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="mode", action="store_const", const="dry-run",
                      help="change nothing; log and audit what would be done (overrides the config's mode)")
    mode.add_argument("--live", dest="mode", action="store_const", const="live", help="make the changes (overrides the config's mode)")
    parser.add_argument("--source", choices=("bpf", "auto", "procfs"), default=None,
                        help="where samples come from, overriding the config's [daemon] source (default there: bpf, "
                             "which refuses to start without the probes; procfs, and auto when it falls back, "
                             "run degraded: no tail, no blame)")
    parser.add_argument("--record", metavar="FILE",
                        help="keep a rolling recording of every tick's sample here (overrides the config's [recording] "
                             "path; FILE.1 holds the older half), for 'remediator report', 'replay', 'policy suggest'")
    parser.add_argument("--ticks", type=int, default=None, help=argparse.SUPPRESS)  # stop after N ticks (tests)
    parser.set_defaults(handler=run_daemon)


def run_daemon(args: argparse.Namespace) -> int:
    daemon = Daemon(args.config, mode=args.mode, source=args.source, max_ticks=args.ticks,
                    record=args.record)
    daemon.install_signal_handlers()
    logging.getLogger("remediator").debug("config %s loaded", args.config)
    return daemon.run()
