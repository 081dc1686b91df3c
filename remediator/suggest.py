"""`remediator policy suggest`: a draft policy for each much-blamed process that no policy names.

From a Scene (incident.py): the processes the protected threads waited behind in the hot windows,
minus the protected ones and those a policy already names. For each, a [[policy]] to review in git:

- match: specific and stable. `comm` when no other process in the recording had that name and the
  protected service does not; else `exe` when no other process ran that executable; else a
  `cmdline` regex on the script or program (never a pid: pids are reused). Plus `user`, so a
  process of another user taking the same name is not matched.
- trigger: the protected p99 over the threshold the decisions were judged on (or the shipped 2 ms,
  lowered to half the observed peak when the peak stayed under it) in 2 of 4 windows; the offender
  at half a CPU at peak or half its observed blame share.
- the conservative shipped ladder (policies/log-shippers.toml): cpu_idle, affinity, cpuset.
- comments with the evidence: the tail, the blame share, how often it was seen.

Every process-controlled string is written as an escaped TOML basic string, and in comments through
printable(): a comm with quotes or newlines cannot add a key, a table or a line.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from .incident import Blamed, Scene
from .model import PolicySet
from .printable import printable
from .schema import NAME_PATTERN

DEFAULT_THRESHOLD_US = 2000.0
INTERPRETERS = re.compile(r"^(python[0-9.]*|perl[0-9.]*|ruby[0-9.]*|node|nodejs|java|bash|sh|dash|php[0-9.]*)$")


@dataclass(frozen=True)
class Draft:
    name: str
    process: Blamed
    text: str  # the TOML of one [[policy]]


def toml_string(text: str) -> str:
    """A TOML basic string holding exactly `text`: quotes, backslashes and control characters escaped
    (and a lone surrogate, which UTF-8 cannot carry, as U+FFFD)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029):  # and what viewers break lines on
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def comment_text(text: str) -> str:
    """Process-controlled text for a TOML comment: one line, no control characters, valid UTF-8."""
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in printable(text))


def glob_literal(text: str) -> str:
    """An fnmatch glob matching exactly `text`."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def policy_name(blamed: Blamed, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", blamed.comm).strip("-._") or "process"
    base = f"suggested-{base}"[:60]
    name, index = base, 2
    while name in taken or not re.match(NAME_PATTERN, name):
        name, index = f"{base}-{index}", index + 1
    taken.add(name)
    return name


def program_of(cmdline: tuple[str, ...]) -> str | None:
    """The program a command line runs: the script for an interpreter (`python3 /opt/x/job.py`), else argv[0]."""
    if not cmdline:
        return None
    if INTERPRETERS.match(os.path.basename(cmdline[0])):
        for argument in cmdline[1:]:
            if not argument.startswith("-"):
                return argument
        return None
    return cmdline[0]


def choose_match(blamed: Blamed, scene: Scene) -> tuple[list[str], str]:
    """The TOML lines of the match table, and a comment saying why these fields."""
    info = blamed.info
    others = {pid: i for s in scene.samples for pid, i in s.processes.items() if pid != blamed.pid}
    protected_comms = {i.comm for s in scene.samples for pid, i in s.processes.items() if pid in s.protected.pids}
    lines = []
    same_comm = [i for i in others.values() if i.comm == info.comm]
    same_exe = [i for i in others.values() if i.exe == info.exe]
    program = program_of(info.cmdline)
    if info.comm and not same_comm and info.comm not in protected_comms:
        lines.append(f"comm = [{toml_string(glob_literal(info.comm))}]")
        why = "comm: no other process in the recording had this name"
    elif info.exe and info.exe.startswith("/") and not same_exe:
        lines.append(f"exe = [{toml_string(glob_literal(info.exe))}]")
        why = (f"exe: its comm is shared ({len(same_comm)} other processes)" if same_comm else
               "exe: its comm is the protected service's") + ", its executable is not"
    elif program:
        lines.append(f"cmdline = {toml_string('(^| )' + re.escape(program) + '( |$)')}")
        why = "cmdline: its comm and executable are shared with other processes; the program it runs is not"
    else:
        return [], "no stable field: its comm and executable are shared and its command line is empty"
    if info.user:
        lines.append(f"user = [{toml_string(info.user)}]")
    elif info.uid >= 0:
        lines.append(f"user = [{toml_string(str(info.uid))}]")
    return lines, why


def _ms(us: float) -> str:
    return f"{us / 1000:.3g}ms"


def draft(blamed: Blamed, scene: Scene, name: str, threshold_us: float) -> Draft | None:
    match_lines, why = choose_match(blamed, scene)
    if not match_lines:
        return None
    hot = scene.hot(threshold_us)
    tails = sorted((s.protected.percentile_ns(99) or 0) / 1000 for s in (hot or scene.samples))
    peak_us = tails[-1] if tails else 0.0
    above_us = threshold_us if hot else max(100.0, round(peak_us / 2, -2))
    blame_share = round(min(0.3, max(0.1, blamed.share / 2)), 2)
    window = [s.ts for s in scene.samples]
    span = (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(min(window)))} to "
            f"{time.strftime('%H:%M:%S', time.gmtime(max(window)))} UTC") if window else "the recording"
    info = blamed.info
    text = f"""# Suggested by 'remediator policy suggest' from {span}: review before use.
# Evidence: the protected p99 run-queue wait was over {_ms(threshold_us)} in {len(hot)} of {len(scene.samples)} windows
# (up to {_ms(peak_us)}); {comment_text(info.comm)} (pid {blamed.pid}, {comment_text(info.exe or '?')}) was on the protected
# threads' CPU for {blamed.share:.0%} of their wait in those windows, the most blamed in {blamed.windows} and seen in {blamed.seen}.
# Command line: {comment_text(' '.join(info.cmdline))[:200]}
# Match on {why}.
[[policy]]
name = {toml_string(name)}
description = {toml_string(f"Drafted for {info.comm} (blamed for {blamed.share:.0%} of the protected wait)")}
[policy.match]
{chr(10).join(match_lines)}
[policy.trigger]
tail = {{ percentile = 99.0, above = "{_ms(above_us)}", windows = 2, of = 4 }}
offender = {{ cpu = 0.5, cpu_kind = "peak", blame_share = {blame_share}, require = "all" }}
# The conservative shipped ladder (policies/log-shippers.toml): gentlest first, each exactly reversible.
[[policy.actions]]
cpu_idle = true
settle = "2s"
[[policy.actions]]
affinity = "unprotected"
settle = "5s"
[[policy.actions]]
cpuset = {{ cpus = "unprotected", cgroup = "suggested" }}
settle = "30s"
[policy.limits]
cooldown = "60s"
max_actions_per_hour = 6
revert_after_quiet = "10m"
min_cpus = 1
"""
    return Draft(name, blamed, text)


def suggest(scene: Scene, policies: PolicySet, limit: int = 3, min_share: float = 0.1) -> tuple[list[Draft], list[str]]:
    """Drafts for the most blamed processes no policy names, and notes on the ones skipped."""
    threshold = scene.threshold_us() or DEFAULT_THRESHOLD_US
    drafts, notes = [], []
    taken = {policy.name for policy in policies.policies}
    for blamed in scene.top_blamed(threshold, limit=10):
        if len(drafts) >= limit or blamed.share < min_share:
            break
        who = f"{printable(blamed.comm)} (pid {blamed.pid})"
        if blamed.info is None or blamed.info.kernel_thread:
            notes.append(f"{who}: {'a kernel thread' if blamed.info else 'not described in the recording'}: skipped")
            continue
        selected = policies.select(blamed.info)
        if selected is not None:
            notes.append(f"{who}: already named by policy {selected[0].name}")
            continue
        result = draft(blamed, scene, policy_name(blamed, taken), threshold)
        if result is None:
            notes.append(f"{who}: no stable field to match it by: skipped")
        else:
            drafts.append(result)
    return drafts, notes
