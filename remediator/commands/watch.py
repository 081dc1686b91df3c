"""`remediator watch`: the protected service's run-queue tail, who burns CPU, and who is to blame."""

from __future__ import annotations

import argparse
import json
import sys

from ..probes import ProbeSettings, describe_program, window_shift_for
from ..view import interval_view, render_text
from .common import add_selector_arguments, add_source_arguments, interval_samples, open_collector, positive_float

EXAMPLES = """\
examples:
  sudo remediator watch --comm nginx                 every nginx process, refreshed each second
  sudo remediator watch --unit api.service -i 5      a systemd unit, 5 s intervals
  sudo remediator watch --pid 1234 --json -c 10      10 JSON objects, one per second
  sudo remediator watch --cgroup /system.slice/api.service --top 10
  sudo remediator watch --pid 1234 --source procfs   without eBPF (no tail, no blame)
  remediator watch --ebpf                            print the eBPF program and cflags, load nothing
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="live view of the protected service's run-queue latency and its noisy neighbours",
        description=(
            "Show, every interval: the protected threads' run-queue latency (percentiles and a "
            "histogram), the processes using the most CPU (mean and burst peak), and the processes "
            "that were on the CPU while protected threads waited (blame)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_selector_arguments(parser)
    parser.add_argument("-i", "--interval", type=positive_float, default=1.0, metavar="S", help="seconds per refresh (default 1)")
    parser.add_argument("-c", "--count", type=int, default=None, metavar="N", help="stop after N intervals")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="rows in the CPU and blame tables (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per interval (keys in the README)")
    parser.add_argument("--ebpf", action="store_true", help="print the eBPF program and its cflags, then exit")
    add_source_arguments(parser)
    parser.set_defaults(handler=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    if args.ebpf:
        print(describe_program(ProbeSettings(window_shift=window_shift_for(args.window))))
        return 0
    collector, note = open_collector(args)
    clear = sys.stdout.isatty() and not args.json
    if not args.json:
        print(note, file=sys.stderr)
    try:
        for sample in interval_samples(collector, args.interval, args.count):
            view = interval_view(sample, args.top)
            if args.json:
                print(json.dumps(view), flush=True)
            else:
                text = render_text(view, sample)
                print(("\x1b[H\x1b[2J" if clear else "") + text + ("" if clear else "\n"), flush=True)
    finally:
        collector.close()
    return 0
