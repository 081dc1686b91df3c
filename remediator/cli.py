"""`remediator` command line: one subcommand per module, each registering its own parser.

Every error a user can cause ends as one line on stderr and exit status 1 (2 for usage errors);
a traceback here is a bug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from .errors import LocatedError, RemediatorError

# Modules that define `register(subparsers)`; each adds its parser and sets `handler`.
COMMAND_MODULES = (
    "remediator.commands.watch",
    "remediator.commands.record",
    "remediator.commands.policy",
    "remediator.commands.run",
    "remediator.commands.revert",
    "remediator.commands.audit",
    "remediator.commands.report",
    "remediator.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remediator",
        description="Find and tame noisy neighbours of a latency-sensitive service, from the scheduler's point of view.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'remediator COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a command not built yet
            raise
        module.register(subparsers)
    return parser


def configure_logging(verbose: bool) -> None:
    from .printable import printable

    # journald adds its own timestamps; "<N>" prefixes give it the priority (sd-daemon(3)).
    class JournalFormatter(logging.Formatter):
        PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

        def format(self, record: logging.LogRecord) -> str:
            prefix = f"<{self.PRIORITIES.get(record.levelno, 6)}>" if _stderr_is_journal() else ""
            # One record, one line: process names in messages cannot forge entries (printable.py).
            return f"{prefix}{record.levelname.lower()}: {printable(record.getMessage())}"

    from .health import CountingStreamHandler

    handler = CountingStreamHandler(sys.stderr)  # a failed log write is counted, never fatal
    handler.setFormatter(JournalFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)


def _stderr_is_journal() -> bool:
    import os

    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except RemediatorError as exc:
        if isinstance(exc, LocatedError) or getattr(exc, "diagnostics", None):
            print(exc, file=sys.stderr)  # already "file:line:col: error: message", one per line
        else:
            print(f"remediator: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `remediator watch --json | head`: the reader left; that is not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
