"""`remediator revert`: put back the original nice, affinity and cgroup of processes, from the journal.

It restores exactly what the journal holds: each thread its own original value, threads created
since the change the default, a process only if it is still the same one (pid and start time),
and a value only while it still is the one remediator set (what someone else changed since stays);
entries of processes that are gone (or whose pid now names another process) are dropped untouched.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..config import load_config
from ..errors import Location, LocatedError, RemediatorError
from ..executor import Executor
from ..journal import DEFAULT_JOURNAL_PATH, Journal
from ..printable import printable
from ..procfs import ProcFS
from ..schema import PolicyErrors
from ..tomlpos import TomlSyntaxError, parse
from ..trustedfs import UntrustedPath, read_bytes

log = logging.getLogger(__name__)

DESCRIPTION = """\
Restore what remediator changed, from its journal: nice and CPU affinity per thread, and
the cpuset cgroup (the process moves back; the remediator cgroup is removed once empty).

Prints one line per change: restored; left-changed-by-other (someone changed what
remediator had set since: their value stays); dropped (the process is gone, or its pid now
names another process: nothing is touched); or an error. Exit status 0 when everything
restorable was restored, 1 otherwise. Stop the daemon first: it holds a lock on the
journal while it runs.
"""

EXAMPLES = """\
examples:
  sudo remediator revert --all                 restore every change still in the journal
  sudo remediator revert --pid 2621            only what was changed on pid 2621
  sudo remediator revert --all --journal /tmp/journal.jsonl
  sudo remediator revert --all --config /etc/remediator/remediator.toml
                                               the journal named by [daemon] journal there
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "revert",
        help="restore the original nice, CPU affinity and cgroup of processes from the journal",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every active change in the journal")
    which.add_argument("--pid", type=int, metavar="N", help="the changes made to process N")
    parser.add_argument("--journal", metavar="PATH", help=f"the journal file (default {DEFAULT_JOURNAL_PATH}; overrides --config)")
    parser.add_argument("--config", metavar="FILE", help="take the journal path from this config file's [daemon] journal")
    parser.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_revert)


def journal_path_from_config(config_path: str) -> str:
    """The journal named by a config file's [daemon] journal (relative to the file; default when absent).

    The config loader checks the whole file. When something else in it is wrong (a policy directory
    missing, say), revert still reads the one key it needs: it is the way back, and must not be
    blocked by a mistake elsewhere. It says so on stderr.
    """
    try:
        return str(load_config(config_path).journal_path)
    except UntrustedPath:
        raise
    except PolicyErrors as exc:
        journal = _journal_key_only(config_path)
        problems = str(exc).splitlines()
        log.warning(
            "%s does not load (%d problem%s, first: %s); using its [daemon] journal (%s) anyway",
            config_path, len(problems), "" if len(problems) == 1 else "s", problems[0] if problems else "?", journal,
        )
        return journal


def _journal_key_only(config_path: str) -> str:
    try:
        data = parse(read_bytes(config_path), config_path).data
    except OSError as exc:
        raise RemediatorError(f"{config_path}: cannot read ({exc.strerror})") from None
    except TomlSyntaxError as exc:
        # The same located message as every other reader (whatever tomli version is installed).
        raise LocatedError(exc.location, exc.message) from None
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise LocatedError(Location(config_path), "[daemon] must be a table")
    journal = daemon.get("journal", DEFAULT_JOURNAL_PATH)
    if not isinstance(journal, str) or not journal:
        raise LocatedError(Location(config_path), f"[daemon] journal must be a file path, not {journal!r}")
    # Relative to the config file, as the config loader resolves it.
    base = Path(config_path).absolute().parent
    return os.path.normpath(base / os.path.expanduser(journal))


def run_revert(args: argparse.Namespace) -> int:
    path = args.journal or (journal_path_from_config(args.config) if args.config else DEFAULT_JOURNAL_PATH)
    if not Path(path).exists():
        print(f"nothing to revert: no journal at {path}")
        return 0
    procfs = ProcFS(args.proc_root)
    try:
        # Through trustedfs: as root, a journal (or a directory on its path) others could change is refused.
        journal = Journal(path)
    except OSError as exc:
        raise RemediatorError(f"cannot open the journal {path}: {exc.strerror} (it is root's: run with sudo)") from None
    with journal:
        executor = Executor(journal, procfs, dry_run=False)
        outcomes = executor.restore() if args.all else executor.restore_pid(args.pid)
    if not outcomes:
        scope = "" if args.all else f" for pid {args.pid}"
        print(f"nothing to revert{scope}: no active change in {path}")
        return 0
    for outcome in outcomes:
        print(printable(str(outcome)), flush=True)  # messages carry comm and cgroup paths
    return 1 if any(outcome.is_error for outcome in outcomes) else 0
