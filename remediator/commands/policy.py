"""`remediator policy check | explain | schema`: review policies before they reach a host."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import CONFIG_FILE_NAME, load_config, looks_like_config, parse_source
from ..cpulist import CpuListError, online_cpus, parse_cpulist
from ..errors import RemediatorError
from ..baseline import Baselines
from ..engine import import_state
from ..actuators import ACTION_KINDS
from ..explain import LearnedBaselines, explain
from ..policy import check_paths, load_policies, read_policy_files
from ..printable import printable
from ..procfs import ProcFS
from ..schema import Diagnostic, json_schema, reference_markdown
from ..selectors import ProtectSelectors
from ..statefile import current_boot_id, load_state, state_path_for

CHECK_EXAMPLES = """\
Prints every problem as file:line:col: severity: message; exits 0 when there is no error
(warnings do not fail), 1 otherwise. A config file among PATHS (named remediator.toml, or with
[protect]/[daemon] tables) is checked too, with the policy paths it names.

examples:
  remediator policy check policies/ examples/remediator.toml
  remediator policy check --format json policies/ > report.json      for CI bots
  remediator policy check --online-cpus 0-15 policies/               against a 16-CPU host
  sudo remediator policy check --host /etc/remediator/remediator.toml  and which steps cannot work here now
"""

EXPLAIN_EXAMPLES = """\
Lists, per policy, the live processes it matches (and by which field), what its first step would
do to each (from the current nice, affinity and cpuset cgroup, read only), which matched processes
are excluded for safety and why, and which processes are protected. Changes nothing.

examples:
  sudo remediator policy explain --config /etc/remediator/remediator.toml
  sudo remediator policy explain --protect-comm nginx policies/
  sudo remediator policy explain --protect-unit api.service --request-cpus 0-3 --format json
"""

SUGGEST_EXAMPLES = """\
For each of the most blamed processes (in the windows where the protected tail was over the
threshold) that no policy names, prints a draft [[policy]] with the evidence in comments: review
it, then commit it to the policy repository. It passes 'policy check' as printed.

examples:
  remediator policy suggest --config /etc/remediator/remediator.toml --since 2h > drafts.toml
  remediator policy suggest --recording incident.jsonl --audit audit.jsonl --policies policies/
  remediator replay incident.jsonl --policies policies/ --against drafts.toml     what the draft would do
"""

SCHEMA_EXAMPLES = """\
examples:
  remediator policy schema > policy.schema.json               for taplo / Even Better TOML
  remediator policy schema --kind config > config.schema.json
  remediator policy schema --format markdown                  the key tables of docs/policy-format.md
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "policy",
        help="check, explain and describe policy and config files",
        description="Review remediation policies like code: check them, see what they would touch, get their JSON Schema.",
    )
    commands = parser.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: _usage(parser))

    check = commands.add_parser(
        "check",
        help="check config and policy files; exit 1 on any error",
        description="Check remediator config and policy files.",
        epilog=CHECK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default: ./policies and ./remediator.toml)")
    check.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    check.add_argument(
        "--online-cpus", type=_cpulist, metavar="LIST", help="check CPU lists against these CPUs instead of this host's online CPUs"
    )
    check.add_argument(
        "--host", action="store_true",
        help="also warn, per step, where a nice or sched step cannot work on this host now: the offenders each policy "
        "matches are in another scheduling group (cpu cgroup or autogroup) than the protected processes, which the "
        "config among PATHS names; and where a cpu_weight, cpu_idle, cpu_max or cpuset step is not available (no "
        "cgroup cpu or cpuset controller) (read only)",
    )
    check.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    check.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    check.set_defaults(handler=run_check)

    suggest = commands.add_parser(
        "suggest",
        help="draft a policy for each much-blamed process no policy names, from an audit log and a recording",
        description="Draft policies from what was seen: the most blamed processes no policy names.",
        epilog=SUGGEST_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .report import add_scene_arguments

    add_scene_arguments(suggest)
    suggest.add_argument("--policies", action="append", default=[], metavar="PATH",
                         help="the policies in force (default: the config's, else ./policies if it exists)")
    suggest.add_argument("--top", type=int, default=3, metavar="N", help="at most N drafts (default 3)")
    suggest.add_argument("--min-share", type=float, default=0.1, metavar="F",
                         help="only processes with at least this share of the protected wait (default 0.1)")
    suggest.set_defaults(handler=run_suggest)

    explain_parser = commands.add_parser(
        "explain",
        help="show which live processes each policy matches and what its first step would do",
        description="Show what the policies would touch on this host, now.",
        epilog=EXPLAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain_parser.add_argument("paths", nargs="*", metavar="PATH", help="policy files or directories (default: the config's, else ./policies)")
    explain_parser.add_argument("--config", metavar="FILE", help="remediator.toml: protected selectors, request CPUs, policy paths")
    group = explain_parser.add_argument_group("what is protected (repeatable; added to the config's)")
    group.add_argument("--protect-pid", type=int, action="append", default=[], metavar="N")
    group.add_argument("--protect-comm", action="append", default=[], metavar="GLOB")
    group.add_argument("--protect-unit", action="append", default=[], metavar="NAME")
    group.add_argument("--protect-cgroup", action="append", default=[], metavar="PATH")
    explain_parser.add_argument(
        "--request-cpus", metavar="LIST|auto", help="CPUs the request path owns (default: the config's, else auto)"
    )
    explain_parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    explain_parser.add_argument("--proc-root", default="/proc", help="procfs to read processes from (default /proc)")
    explain_parser.add_argument("--sysfs-root", default="/sys", help="sysfs to read the online CPUs from (default /sys)")
    explain_parser.set_defaults(handler=run_explain)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the policy (or config) format",
        description="Print a JSON Schema (draft-07) of the format, for editors; or the key reference as Markdown.",
        epilog=SCHEMA_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    schema.add_argument("--kind", choices=("policy", "config"), default="policy", help="which file (default policy)")
    schema.add_argument("--format", choices=("json", "markdown"), default="json", help="json: the schema; markdown: the key reference")
    schema.set_defaults(handler=run_schema)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cpulist(text: str) -> frozenset[int]:
    try:
        return parse_cpulist(text)
    except CpuListError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_online(sysfs_root: str) -> frozenset[int] | None:
    try:
        return online_cpus(sysfs_root)
    except (OSError, CpuListError):
        return None  # no sysfs (a container build): skip the host check rather than guess


def run_check(args: argparse.Namespace) -> int:
    paths = args.paths
    if not paths:
        paths = [p for p in ("policies", CONFIG_FILE_NAME) if Path(p).exists()]
        if not paths:
            raise RemediatorError("nothing to check: give PATHS (no ./policies or ./remediator.toml here)")
    online = args.online_cpus if args.online_cpus is not None else _host_online(args.sysfs_root)
    diagnostics = check_paths(paths, online_cpus=online)
    errors = sum(1 for d in diagnostics if d.severity == "error")
    notes: list[str] = []
    host = getattr(args, "host", False)  # callers that build the namespace themselves leave it out
    if host and not errors:
        if online is None:
            raise RemediatorError(f"--host: cannot read the online CPUs from {args.sysfs_root}/devices/system/cpu/online")
        found, notes = host_diagnostics(paths, online, ProcFS(getattr(args, "proc_root", "/proc")))
        diagnostics += found
    warnings = len(diagnostics) - errors
    if args.format == "json":
        print(
            json.dumps(
                {"ok": errors == 0, "errors": errors, "warnings": warnings, "diagnostics": [d.to_json() for d in diagnostics],
                 **({"host_notes": notes} if host else {})},
                indent=2,
            )
        )
    else:
        for diagnostic in diagnostics:
            print(diagnostic)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"{errors} error{'s' if errors != 1 else ''}, {warnings} warning{'s' if warnings != 1 else ''}", file=sys.stderr)
    return 1 if errors else 0


def host_diagnostics(paths: list, online: frozenset[int], procfs: ProcFS) -> tuple[list[Diagnostic], list[str]]:
    """A warning at each nice or sched step that cannot reach the running protected processes from
    a process its policy matches now (what the daemon would skip), and notes on what could not be told."""
    files, _ = read_policy_files(paths)
    configs = [path for path, raw in files if looks_like_config(parse_source(raw, str(path))[0], str(path))]
    if not configs:
        raise RemediatorError(f"--host: no config ({CONFIG_FILE_NAME}) among the paths: it names the protected processes")
    config = load_config(configs[0])
    policies = load_policies(config.policy_paths, online_cpus=online)
    report = explain(policies, config.protect, procfs, online, request_cpus=config.request_cpus)
    notes = [note for note in report.notes if "protected" in note]
    if not report.protected:
        notes.append("no protected process is running: which steps can work cannot be told")
    diagnostics = []
    for entry in report.policies:
        for item in entry.processes:
            for _, step, why in item.cannot_work:
                diagnostics.append(Diagnostic(
                    step.location, "warning",
                    f"policy {entry.policy.name}: {step.describe()} cannot work on this host now for pid {item.info.pid} "
                    f"({printable(item.info.comm)}): {why}; the daemon skips it at once", "step-cannot-work"))
    # A host fact: said at every step of such a kind, whether or not a process matches now.
    unavailable = {kind.name: kind.unavailable() for kind in ACTION_KINDS}
    for policy in policies.policies:
        for step in policy.steps:
            if unavailable[step.kind]:
                diagnostics.append(Diagnostic(
                    step.location, "warning",
                    f"policy {policy.name}: {step.describe()} is {unavailable[step.kind]}; the daemon's step fails and the "
                    "ladder goes on after its settle", "step-not-available"))
    return diagnostics, notes


def run_explain(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else None
    protect = ProtectSelectors.build(
        pids=list(config.protect.pids if config else ()) + args.protect_pid,
        comms=list(config.protect.comms if config else ()) + args.protect_comm,
        cgroups=list(config.protect.cgroups if config else ()) + args.protect_cgroup,
        units=list(config.protect.units if config else ()) + args.protect_unit,
        users=config.protect.users if config else (),
    )
    if args.request_cpus is not None:
        request = None if args.request_cpus == "auto" else _parse_request(args.request_cpus)
    else:
        request = config.request_cpus if config else None
    paths: list = args.paths or (list(config.policy_paths) if config else ["policies"])
    online = _host_online(args.sysfs_root)
    if online is None:
        raise RemediatorError(f"cannot read the online CPUs from {args.sysfs_root}/devices/system/cpu/online")
    policies = load_policies(paths, online_cpus=online)
    report = explain(policies, protect, ProcFS(args.proc_root), online, request_cpus=request,
                     learned=_learned_baselines(config, args.proc_root))
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(report.to_text())
    return 0


def _learned_baselines(config, proc_root: str) -> LearnedBaselines:
    """The baselines the daemon of `config` learned, from the engine state it saves beside its
    journal (read only); empty, saying why, when there are none to use."""
    now = time.monotonic()  # engine time: CLOCK_MONOTONIC, as the daemon's samples
    if config is None:
        return LearnedBaselines(Baselines(), now, "no --config: the daemon's learned baseline is not read")
    path = state_path_for(config.journal_path)
    saved, why = load_state(path, current_boot_id(proc_root))
    if saved is None:
        return LearnedBaselines(Baselines(), now, f"{path}: {why}")
    try:
        return LearnedBaselines(import_state(saved).baselines, now, f"learned by the daemon: {path}")
    except ValueError as exc:
        return LearnedBaselines(Baselines(), now, f"{path}: {exc}")


def _parse_request(text: str) -> frozenset[int]:
    try:
        return parse_cpulist(text)
    except CpuListError as exc:
        raise RemediatorError(f"--request-cpus: {exc}") from None


def run_schema(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        sys.stdout.write(reference_markdown())
    else:
        print(json.dumps(json_schema(args.kind), indent=2))
    return 0


def run_suggest(args: argparse.Namespace) -> int:
    from ..config import parse_source
    from ..policy import compile_policies
    from ..schema import has_errors
    from ..suggest import suggest
    from .report import scene_from_args

    scene = scene_from_args(args)
    if not scene.samples:
        raise RemediatorError("policy suggest needs a recording with samples in that time range (--recording or the "
                              "config's [recording])")
    paths = args.policies or (list(load_config(args.config).policy_paths) if args.config else [])
    if not paths and Path("policies").is_dir():
        paths = [Path("policies")]
    policies = load_policies(paths) if paths else load_policies([])
    drafts, notes = suggest(scene, policies, args.top, args.min_share)
    for note in notes:
        print(f"policy suggest: {note}", file=sys.stderr)
    if not drafts:
        print("policy suggest: no much-blamed process is left unnamed by the policies: nothing to suggest", file=sys.stderr)
        return 0
    for index, item in enumerate(drafts):
        document, problems = parse_source(item.text, f"<draft {item.name}>")
        if document is not None:
            problems += compile_policies(document)[1]
        if has_errors(problems):  # a bug here, never the operator's: say so plainly
            raise RemediatorError(f"draft {item.name} does not pass its own check: " + "; ".join(map(str, problems)))
        print(("\n" if index else "") + item.text, end="")
    return 0
