"""The policy and config format, described once.

`POLICY_FILE` and `CONFIG_FILE` below are the single declarative description of both TOML files:
every key with its type, default, range and meaning. Three things are derived from them, so they
cannot drift apart:

  - `Checker`: the structural pass of `policy check` and of the loaders (unknown keys with a
    did-you-mean, missing keys, types, ranges, durations, CPU lists, per-item checks such as
    globs), producing located diagnostics and a "clean" tree with defaults filled in;
  - `json_schema()`: the JSON Schema that editors (taplo / Even Better TOML) use;
  - `reference_markdown()`: the key tables in docs/policy-format.md.

The compile steps in policy.py and config.py then turn the clean tree into frozen dataclasses and
check what needs more than one key (always vs tail, ladders, conflicts).
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .actuators import ACTION_KINDS
from .cpulist import CpuListError, parse_cpulist
from .keys import Key
from .durations import DURATION_PATTERN, DURATION_RE, format_duration, parse_duration
from .errors import Location, RemediatorError
from .matching import (
    check_not_per_user,
    check_cgroup_glob,
    check_comm_glob,
    check_exe_glob,
    check_protect_cgroup,
    check_protect_unit,
    check_regex,
    check_unit_glob,
    check_user,
    resolve_protect_user,
)
from .tomlpos import Document, KeyPath, format_key_path

# -- diagnostics ------------------------------------------------------------------------------

# Codes of diagnostics about a whole file, which have no line (everything else has one).
FILE_LEVEL_CODES = frozenset({"unreadable", "no-policy", "not-found"})


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a file: `file:line:col: error: message`."""

    location: Location
    severity: str  # "error" | "warning"
    message: str
    code: str  # stable identifier for CI bots: "unknown-key", "type", "range", ...
    key: str = ""  # the key path concerned, e.g. "policy[0].actions[1].nice" ("" for the whole file)

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"

    def to_json(self) -> dict:
        return {
            "path": self.location.path,
            "line": self.location.line,
            "column": self.location.column,
            "severity": self.severity,
            "code": self.code,
            "key": self.key,
            "message": self.message,
        }


class PolicyErrors(RemediatorError):
    """Policy or config files that do not load; str() lists every diagnostic, one per line."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        shown = errors or self.diagnostics
        super().__init__("\n".join(str(d) for d in shown))


def has_errors(diagnostics: list[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)


# -- values -----------------------------------------------------------------------------------

BASELINE_PATTERN = r"^([0-9]+(\.[0-9]+)?)x baseline$"
CPULIST_PATTERN = r"[0-9]+(-[0-9]+)?(, *[0-9]+(-[0-9]+)?)*"
_BASELINE = re.compile(BASELINE_PATTERN)
_CPULIST = re.compile(CPULIST_PATTERN)


@dataclass(frozen=True)
class BaselineMultiple:
    """A threshold written relative to the protected service's learned quiet baseline: "5x baseline"."""

    factor: float


def show(value: Any) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 40 else text[:37] + "..."
    return str(value)


def toml_type(value: Any) -> str:
    """The TOML name of a decoded value's type, with an article: 'a string', 'an integer'."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return type(value).__name__


# -- the format ---------------------------------------------------------------------------------

# The engine keeps the windows of three times the longest settle (a step is verified over its
# settle period before and up to three after) and of the largest `of`; these bounds bound its
# memory (engine.history_for).
MAX_SETTLE_S = 600.0


TYPES = {
    "string": "string",
    "enum": "string, one of",
    "boolean": "boolean",
    "integer": "integer",
    "number": "number",
    "duration": "duration",
    "duration-or-never": 'duration or "never"',
    "threshold": 'duration, or a multiple of the learned baseline (`"5x baseline"`)',
    "cpus": "CPU list",
    "strings": "string or array of strings",
    "integers": "array of integers",
    "users": "array of user names (strings) and uids (integers)",
    "regex": "string (regular expression)",
    "table": "table",
    "table-array": "array of tables",
}

# At most 200 characters: the name goes into cgroup and scope names (with ".uidN" and ".scope"), which systemd caps at 255.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
MATCHES_NOTHING = "is an empty list, which matches nothing; remove the key or give at least one item"

MATCH_KEYS = (
    Key(
        "comm",
        "strings",
        "Globs (fnmatch: `*`, `?`, `[...]`) on the process name, which the kernel cuts to 15 characters: "
        "`fluent-bit-forwarder` runs as `fluent-bit-forw`. A glob that can never match a 15-character name is an error.",
        item_check=check_comm_glob,
        empty_message=MATCHES_NOTHING,
        example='comm = ["fluent-bit", "td-agent*"]',
    ),
    Key(
        "exe",
        "strings",
        "Globs on the full path of the executable (/proc/PID/exe); `*` also matches `/`. Must start with `/` or a wildcard.",
        item_check=check_exe_glob,
        empty_message=MATCHES_NOTHING,
        example='exe = ["/usr/bin/fluent-bit", "/opt/*/bin/fluent-bit"]',
    ),
    Key(
        "cmdline",
        "regex",
        "A Python regular expression searched (not anchored) in the command line, arguments joined with spaces; the first 32 KiB of the arguments are read.",
        item_check=check_regex,
        example='cmdline = "logstash.*-f /etc/logstash"',
    ),
    Key(
        "cgroup",
        "strings",
        "Globs on the process's cgroup path inside the hierarchy (v2 path, or v1 name=systemd); the process "
        "matches when the glob matches its cgroup or any parent of it. Write `/system.slice/x.service`, "
        "not `/sys/fs/cgroup/...`.",
        item_check=check_cgroup_glob,
        empty_message=MATCHES_NOTHING,
        example='cgroup = ["/system.slice/fluent-bit.service"]',
    ),
    Key(
        "unit",
        "strings",
        "Globs on the system manager's units of the process (its slices and its service or scope: the first one in the "
        "cgroup path, below slices only; names in a unit's delegated subtree such as user@UID.service's do not count); "
        "a name without a dot means `.service`.",
        item_check=check_unit_glob,
        empty_message=MATCHES_NOTHING,
        example='unit = ["fluent-bit.service"]',
    ),
    Key(
        "user",
        "strings",
        "User names or numeric uids (as strings) owning the process (real uid).",
        item_check=check_user,
        empty_message=MATCHES_NOTHING,
        example='user = ["root", "td-agent"]',
    ),
    Key(
        "ancestor",
        "strings",
        "Comm globs of any ancestor (parent first, PID 1 excluded), so `gzip` started by `logrotate` can be matched through its parent.",
        item_check=check_comm_glob,
        empty_message=MATCHES_NOTHING,
        example='ancestor = ["logrotate"]',
    ),
    Key(
        "descendants",
        "boolean",
        "`true`: the policy also covers the matched process's descendants (forked and exec'd children, found through "
        "parent pid and start time, so a reused parent pid never counts). The trigger judges the tree's CPU and blame "
        "together, rolled up to the matched ancestor, and each step is applied to the tree's processes that ran "
        "(the ones burning the CPU); a descendant that another policy names is governed by that one. Not a selector: "
        "give at least one of the keys above.",
        default=False,
        example="descendants = true",
    ),
)

TAIL_KEYS = (
    Key("percentile", "number", "Which percentile of the protected run-queue latency to watch.", default=99.0, minimum=0, exclusive_minimum=True, maximum=100),
    Key("above", "threshold", "The threshold: a window counts as bad when that percentile is above it. Absolute (`\"2ms\"`), or "
        "relative to the service's own quiet baseline (`\"5x baseline\"`, more than 1x), learned online from quiet windows and "
        "kept across restarts; a relative threshold needs `at_least` and `at_most`.", required=True, minimum=1e-6, maximum=10.0,
        example='above = "5x baseline"'),
    Key("at_least", "duration", "With a relative `above`: the floor of the threshold, so a tiny baseline cannot make the trigger "
        "hair-trigger.", minimum=1e-6, maximum=10.0, example='at_least = "1ms"'),
    Key("at_most", "duration", "With a relative `above`: the ceiling of the threshold, so a baseline learned from a slowly "
        "worsening tail cannot disable the trigger; also the threshold until the baseline is learned.", minimum=1e-6,
        maximum=10.0, example='at_most = "2ms"'),
    Key("windows", "integer", "N: how many of the last M windows must be bad.", default=3, minimum=1, maximum=600),
    Key("of", "integer", "M: how many recent windows (ticks) are considered (the daemon keeps at least the largest M).", default=5, minimum=1, maximum=600),
    Key("within", "duration", "Also fire at once, off the tick (eBPF source only), when `waits` protected waits each longer "
        "than `above` (for a relative `above`: than `at_most`) end within this span and the process ran during every one of them (each is blamed on it). "
        "A lone spike never fires: at least 2 waits are needed. The tick-driven form above still applies.",
        minimum=1e-3, maximum=10.0, example='within = "50ms"'),
    Key("waits", "integer", "With `within`: how many blamed waits over `above` within that span fire the trigger (2 when not given).",
        minimum=2, maximum=8),
)

OFFENDER_KEYS = (
    Key("cpu", "number", "CPU use of the process, in CPUs (1.0 = one CPU busy), at or above which it is an offender.", minimum=0, exclusive_minimum=True, maximum=4096),
    Key("cpu_kind", "enum", "`mean`: average over the window; `peak`: the highest burst inside it.", default="mean", choices=("mean", "peak")),
    Key("blame_share", "number", "Share (0..1] of the protected threads' run-queue wait spent behind this process.", minimum=0, exclusive_minimum=True, maximum=1),
    Key("require", "enum", "With both `cpu` and `blame_share`: `all` (both must hold: CPU burnt on another CPU is no harm to the "
        "service) or `any` (either suffices: the trigger can then fire on CPU alone, and `policy check` warns).",
        default="all", choices=("all", "any")),
)

TRIGGER_KEYS = (
    Key("always", "boolean", "`true`: static placement at exec: the whole ladder is applied at once, with no condition, and never reverted; then `tail` and `offender` must be absent.", default=False),
    Key("tail", "table", "The protected service's latency condition (required unless `always`).", keys=TAIL_KEYS,
        example='tail = { percentile = 99.0, above = "5x baseline", at_least = "1ms", at_most = "2ms", windows = 3, of = 5, within = "50ms", waits = 2 }'),
    Key("offender", "table", "Which matched processes are to blame (required unless `always`; give `cpu`, `blame_share` or both).", keys=OFFENDER_KEYS,
        example='offender = { cpu = 0.5, cpu_kind = "peak", blame_share = 0.2, require = "all" }'),
)

STEP_KEYS = tuple(key.name for kind in ACTION_KINDS for key in kind.keys)  # a step has exactly one

ACTION_KEYS = (
    *(key for kind in ACTION_KINDS for key in kind.keys),
    Key("settle", "duration", "How long to wait after this step before the next one is considered; also the period "
        "compared before and after the step to verify it (an inconclusive verdict looks at up to two more periods after "
        "it), so the daemon keeps three times that much history (at most 10 minutes).",
        default="5s", minimum=0, maximum=MAX_SETTLE_S),
)

LIMITS_KEYS = (
    Key("cooldown", "duration", "After the policy's changes on a process are reverted, how long before it may act on that process again (stops flapping).", default="60s", minimum=0, maximum=86400),
    Key("max_actions_per_hour", "integer", "Most steps this policy may apply to one process per hour.", default=6, minimum=1, maximum=3600),
    Key("revert_after_quiet", "duration-or-never", "Undo the policy's changes on a process once the protected tail has stayed under `tail.above` this long; `never` keeps them.",
        default="10m", minimum=1, maximum=7 * 86400),
    Key("min_cpus", "integer", "Fewest CPUs an affinity or cpuset step may leave to the process.", default=1, minimum=1, maximum=4096),
)

POLICY_KEYS = (
    Key("name", "string", "Unique name across all policy files; shown in the audit log (and naming the policy's cgroup for cpu steps, so it may not end in `.uid` and digits).",
        required=True, pattern=NAME_PATTERN, pattern_hint="a letter or digit, then letters, digits, '.', '_', '-'; 200 characters at most", item_check=check_not_per_user),
    Key("description", "string", "Why this policy exists (shown by `policy explain` and in the audit log).", required=True),
    Key("priority", "integer", "When two policies match one process, the higher priority wins (see precedence).", default=0, minimum=-1000, maximum=1000),
    Key("match", "table", "Which processes are offenders: every key given must match; a list means any of its items.", required=True, keys=MATCH_KEYS),
    Key("trigger", "table", "When to act.", required=True, keys=TRIGGER_KEYS),
    Key("actions", "table-array", "The ladder: ordered steps, each with exactly one of "
        + ", ".join(f"`{name}`" for name in STEP_KEYS) + ".", required=True,
        keys=ACTION_KEYS, exactly_one_of=STEP_KEYS, item_name="step"),
    Key("limits", "table", "How often and how long.", keys=LIMITS_KEYS),
)

POLICY_FILE = Key(
    "",
    "table",
    "A policy file: one or more [[policy]] tables.",
    keys=(Key("policy", "table-array", "One policy.", keys=POLICY_KEYS, item_name="policy"),),
)

PROTECT_KEYS = (
    Key("pids", "integers", "Process ids to protect (every thread of each).", allow_empty=True, minimum=1, maximum=4194304, default=[]),
    Key("comm", "strings", "Comm globs of processes to protect (15-character names).", allow_empty=True, item_check=check_comm_glob, default=[]),
    Key("cgroup", "strings", "Cgroup paths (inside the hierarchy); processes in them or below are protected.", allow_empty=True,
        item_check=check_protect_cgroup, default=[]),
    Key("unit", "strings", "Systemd units of the system manager (not a user's, under user@UID.service); a name without a dot "
        "means `.service`.", allow_empty=True, item_check=check_protect_unit, default=[]),
    Key("users", "users", "Users a protected process must run as (real and effective uid): names, resolved when the config "
        "is loaded, or numeric uids. A process the selectors match that runs as anyone else is not protected, and the daemon "
        "logs a warning for it. Any process can set its own comm: with `comm`, give `users`.", allow_empty=True, default=[],
        example='users = ["www-data", 33]'),
    Key("request_cpus", "cpus", "CPUs the request path owns: a CPU list, or `auto` = the CPUs the protected processes' cpuset "
        "cgroups allow (cgroup v2 `cpuset.cpus.effective`, v1 `cpuset.effective_cpus`: the unit's AllowedCPUs), and for a "
        "process whose cgroup allows every online CPU, its threads' own allowed CPUs (sched_getaffinity). Read again when "
        "the protected processes, their thread counts or the online CPUs change, and at least every 5 s.",
        default="auto", keyword="auto"),
)

DAEMON_KEYS = (
    Key("mode", "enum", "`dry-run` describes every change and makes none; `live` acts. A reload (SIGHUP) that changes it switches at once: to `dry-run` after giving every change back, to `live` as a start does (or it is refused, saying why, and the old mode stays); `--live`/`--dry-run` on the command line win over the file.", default="dry-run", choices=("live", "dry-run")),
    Key("source", "enum", "Where samples come from. `bpf`: the eBPF probes, and the daemon refuses to start when they cannot load; "
        "`auto`: the probes, else procfs; `procfs`: procfs only. On procfs there is no run-queue tail and no blame, so only "
        "`always` policies can act, and every status line, log summary and audit record says `degraded: no tail, no blame`.",
        default="bpf", choices=("bpf", "auto", "procfs")),
    Key("tick", "duration", "Sampling period: one window per tick, so a trigger's `windows`/`of` span that many "
        "ticks. Most of the daemon's CPU is per tick: on bench/scale's host (1,000 processes, ~47,000 context "
        "switches a second) 1.17% of one core at 250 ms and 0.79% at 500 ms, side by side. A `within` trigger "
        "does not wait for the tick.", default="250ms", minimum=0.01, maximum=60),
    Key("policies", "strings", "Policy files or directories (every `*.toml` inside), relative to this file.", default=["policies"]),
    Key("journal", "string", "Durable record of original values (relative paths are relative to this file).", default="/var/lib/remediator/journal.jsonl"),
    Key("audit_log", "string", "One JSON line per decision, with its evidence.", default="/var/log/remediator/audit.jsonl"),
    Key("on_start", "enum", "Journal entries of still-running processes at start: `restore` their originals, or `keep` the changes.",
        default="restore", choices=("restore", "keep")),
    Key("revert_on_exit", "boolean", "Restore every change when the daemon stops (SIGTERM).", default=True),
)

RECORDING_KEYS = (
    Key("path", "string", "Where the daemon writes every tick's sample (what `remediator record` writes), relative to this "
        "file; the input of `remediator report`, `replay` and `policy suggest`. Cut over to `PATH.1` at half of `max_bytes`.",
        required=True, example='path = "/var/lib/remediator/recording.jsonl"'),
    Key("max_bytes", "integer", "Most bytes the recording and its older half (`PATH.1`) take together.",
        default=268435456, minimum=65536, maximum=1 << 40),
)

CONFIG_LIMITS_KEYS = (
    Key("max_changes_per_minute", "integer", "Most changes the daemon makes per minute, over all policies; `always` placements count apart, the same number per user.", default=10, minimum=1, maximum=10000),
)

def check_listen(text: str) -> tuple[str, int]:
    """`[metrics] listen`: "HOST:PORT" on a loopback address (127.0.0.0/8, [::1], localhost), as (host, port)."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not host or not port_text.isdigit():
        raise ValueError(f'"{text}" is not HOST:PORT (e.g. "127.0.0.1:9447", "[::1]:9447")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'"{text}": write an IPv6 address in brackets, e.g. "[::1]:9447"')
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'"{text}": {host} is not an IP address (or localhost)') from None
    if not address.is_loopback:
        raise ValueError(f'"{text}": {host} is not a loopback address: the metrics are served to this host only '
                         "(127.0.0.1 or [::1]); let Prometheus or a proxy on the host reach it")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f'"{text}": port {port} is out of range (0..65535; 0 = any free port, logged at start)')
    return str(address), port


METRICS_KEYS = (
    Key("listen", "string", "Serve Prometheus metrics at http://HOST:PORT/metrics, on a loopback address only "
        "(`127.0.0.1:9447`, `[::1]:9447`; port 0 picks a free one, logged at start). Left out: no HTTP server.",
        item_check=check_listen, example='listen = "127.0.0.1:9447"'),
    Key("textfile", "string", "Also write the metrics to this file (replaced atomically every 5 s) for node_exporter's "
        "textfile collector, which reads `*.prom` files. Relative to this file; under the shipped unit its directory "
        "must be writable (ReadWritePaths=).", pattern=r".*\.prom$", pattern_hint="a file name ending in .prom"),
    Key("offender_labels", "integer", "Offender comms that get a series of their own in "
        "`remediator_offender_blame_seconds_total` (the first to earn one): up to this many of processes a policy "
        "governs, and as many of the others; the rest count as \"other\".",
        default=20, minimum=1, maximum=1000),
)

CONFIG_FILE = Key(
    "",
    "table",
    "The daemon's config file, remediator.toml.",
    keys=(
        Key("protect", "table", "What is protected (the same selectors as `watch`); at least one selector.", required=True, keys=PROTECT_KEYS),
        Key("daemon", "table", "How the daemon runs.", keys=DAEMON_KEYS),
        Key("limits", "table", "Global limits.", keys=CONFIG_LIMITS_KEYS),
        Key("recording", "table", "A bounded rolling recording of the daemon's own samples (off when absent).",
            keys=RECORDING_KEYS),
        Key("metrics", "table", "Prometheus metrics (see the README, \"Metrics, alerts and a dashboard\"). Left out: none.",
            keys=METRICS_KEYS),
    ),
)


# -- the structural check ----------------------------------------------------------------------

class Checker:
    """Walks decoded TOML along a Key description; collects located diagnostics.

    `check(spec, data, path)` returns the clean value: tables as dicts with defaults filled in,
    durations in seconds (None for "never"), CPU lists as frozensets (or the keyword string),
    string lists as tuples of normalised items. Keys with errors are left out of the result.
    """

    def __init__(self, document: Document):
        self.document = document
        self.diagnostics: list[Diagnostic] = []

    def error(self, location: Location, path: KeyPath, message: str, code: str) -> None:
        where = format_key_path(path)
        self.diagnostics.append(Diagnostic(location, "error", f"{where or 'top level'}: {message}", code, where))

    def at_value(self, path: KeyPath, message: str, code: str) -> None:
        self.error(self.document.value_location(path), path, message, code)

    def check_table(self, spec: Key, data: Any, path: KeyPath) -> dict | None:
        if not isinstance(data, dict):
            self.at_value(path, f"expected a table, got {toml_type(data)} ({show(data)})", "type")
            return None
        clean: dict[str, Any] = {}
        known = [key.name for key in spec.keys]
        for name, value in data.items():
            key = spec.key(name)
            if key is None:
                self._unknown_key(path + (name,), name, known)
                continue
            result = self.check_value(key, value, path + (name,))
            if result is not _INVALID:
                clean[name] = result
        missing = [key.name for key in spec.keys if key.required and key.name not in data]
        if missing:
            names = ", ".join(f"'{name}'" for name in missing)
            self.at_value(path, f"missing required key{'s' if len(missing) > 1 else ''} {names}", "missing-key")
        for key in spec.keys:
            if key.name in data or key.required:
                continue
            if key.has_default:
                clean[key.name] = self.convert_default(key)
            elif key.type == "table" and not any(child.required for child in key.keys) and all(
                child.has_default or child.type == "table" for child in key.keys
            ):
                clean[key.name] = self.check_table(key, {}, path + (key.name,))
        if spec.exactly_one_of:
            given = [name for name in spec.exactly_one_of if name in data]
            choices = ", ".join(spec.exactly_one_of)
            if not given:
                self.at_value(path, f"needs exactly one of {choices}", "action")
            elif len(given) > 1:
                self.at_value(path, f"gives {' and '.join(given)}: one step does one thing, make them separate steps", "action")
        return clean

    def _unknown_key(self, path: KeyPath, name: str, known: list[str]) -> None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if not close:
            close = [k for k in known if k.lower() == name.lower().replace("-", "_")]
        hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(known)})" if known else ""
        self.error(self.document.key_location(path), path, f"unknown key{hint}", "unknown-key")

    def convert_default(self, key: Key) -> Any:
        value = key.default
        if key.type == "duration":
            return parse_duration(value)
        if key.type == "duration-or-never":
            return None if value == "never" else parse_duration(value)
        if key.type == "cpus":
            return value if value == key.keyword else parse_cpulist(value)
        if key.type in ("strings", "integers"):
            return tuple(value)
        return value

    def check_value(self, key: Key, value: Any, path: KeyPath) -> Any:
        method = getattr(self, "_check_" + key.type.replace("-", "_"))
        return method(key, value, path)

    # One method per type; each returns the clean value or _INVALID after reporting.
    def _check_table(self, key: Key, value: Any, path: KeyPath) -> Any:
        result = self.check_table(key, value, path)
        return _INVALID if result is None else result

    def _check_table_array(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, list):
            hint = f" (write [[{format_key_path(path)}]] headers)" if isinstance(value, dict) else ""
            self.at_value(path, f"expected an array of tables, got {toml_type(value)}{hint}", "type")
            return _INVALID
        if not value and not key.allow_empty:
            self.at_value(path, f"is empty; give at least one {key.item_name}", "empty")
            return _INVALID
        items = []
        for index, item in enumerate(value):
            result = self.check_table(key, item, path + (index,))
            items.append(result)  # None marks an invalid element, keeping indices aligned
        return items

    def _check_string(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, str):
            self.at_value(path, f"expected a string, got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        if not value:
            self.at_value(path, "must not be empty", "empty")
            return _INVALID
        if key.pattern and not re.match(key.pattern, value):
            self.at_value(path, f"{show(value)} is not a valid {key.name} ({key.pattern_hint})", "format")
            return _INVALID
        return self._item(key, value, path)

    def _item(self, key: Key, item: str, path: KeyPath) -> Any:
        if key.item_check is None:
            return item
        try:
            return key.item_check(item)
        except ValueError as exc:
            self.at_value(path, str(exc), _item_code(key))
            return _INVALID

    def _check_regex(self, key: Key, value: Any, path: KeyPath) -> Any:
        return self._check_string(key, value, path)

    def _check_enum(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, str):
            self.at_value(path, f"expected a string, one of {_choices(key)}; got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        if value not in key.choices:
            close = difflib.get_close_matches(value, key.choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            self.at_value(path, f"{show(value)} is not one of {_choices(key)}{hint}", "enum")
            return _INVALID
        return value

    def _check_boolean(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, bool):
            hint = " (write true or false, without quotes)" if value in ("true", "false") else ""
            self.at_value(path, f"expected a boolean, got {toml_type(value)} ({show(value)}){hint}", "type")
            return _INVALID
        return value

    def _check_integer(self, key: Key, value: Any, path: KeyPath) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            self.at_value(path, f"expected an integer, got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        return self._range(key, value, path)

    def _check_number(self, key: Key, value: Any, path: KeyPath) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.at_value(path, f"expected a number, got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        return self._range(key, float(value), path)

    def _range(self, key: Key, value: float, path: KeyPath, shown: str | None = None) -> Any:
        shown = show(value) if shown is None else shown
        low, high = key.minimum, key.maximum
        low_ok = low is None or (value > low if key.exclusive_minimum else value >= low)
        high_ok = high is None or value <= high
        if low_ok and high_ok:  # written this way round so that nan fails
            return value
        self.at_value(path, f"{shown} is out of range ({_range_text(key)})", "range")
        return _INVALID

    def _check_duration(self, key: Key, value: Any, path: KeyPath) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.at_value(path, f"expected a duration string such as \"5s\", got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        if not isinstance(value, str):
            # A bare number: say which string to write (seconds is the likely intent).
            number = str(value) if isinstance(value, int) else f"{value:g}"
            example = f"{number}s" if value >= 0 and DURATION_RE.match(f"{number}s") else "5s"
            self.at_value(path, f"a duration needs a unit: write \"{example}\" (units: us, ms, s, m, h)", "duration")
            return _INVALID
        if key.type == "duration-or-never" and value == "never":
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            also = {"duration-or-never": ' or "never"', "threshold": ' or a multiple of the baseline, e.g. "5x baseline"'}.get(key.type, "")
            self.at_value(
                path, f"{show(value)} is not a duration: write a number and a unit, e.g. \"250ms\", \"3s\", \"10m\"{also} (units: us, ms, s, m, h)", "duration"
            )
            return _INVALID
        return self._range(key, seconds, path, shown=value)

    def _check_duration_or_never(self, key: Key, value: Any, path: KeyPath) -> Any:
        return self._check_duration(key, value, path)

    def _check_threshold(self, key: Key, value: Any, path: KeyPath) -> Any:
        match = _BASELINE.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            return self._check_duration(key, value, path)
        factor = float(match.group(1))
        if not 1 < factor <= 1000:
            self.at_value(path, f"{show(value)}: the multiple of the baseline must be more than 1 and at most 1000", "range")
            return _INVALID
        return BaselineMultiple(factor)

    def _check_cpus(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, str):
            hint = f' (a CPU list is a string: write "{value}")' if isinstance(value, int) and not isinstance(value, bool) else ""
            self.at_value(path, f"expected a CPU list string or \"{key.keyword}\", got {toml_type(value)} ({show(value)}){hint}", "type")
            return _INVALID
        if value == key.keyword:
            return value
        problem = ""
        if not _CPULIST.fullmatch(value):
            problem = "use numbers and ranges separated by commas, e.g. \"2-3,6\""
        else:
            try:
                cpus = parse_cpulist(value)
            except CpuListError as exc:
                problem = str(exc)
            else:
                if max(cpus) > 65535:
                    problem = f"CPU {max(cpus)} is implausibly large"
        if problem:
            self.at_value(path, f"{show(value)} is not a CPU list or \"{key.keyword}\": {problem}", "cpulist")
            return _INVALID
        return cpus

    def _check_strings(self, key: Key, value: Any, path: KeyPath) -> Any:
        if isinstance(value, str):
            if not value:
                self.at_value(path, "must not be empty", "empty")
                return _INVALID
            item = self._item(key, value, path)
            return _INVALID if item is _INVALID else (item,)
        if not isinstance(value, list):
            self.at_value(path, f"expected a string or an array of strings, got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        if not value and not key.allow_empty:
            self.at_value(path, key.empty_message, "empty")
            return _INVALID
        items = []
        valid = True
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.at_value(path + (index,), f"expected a string, got {toml_type(item)} ({show(item)})", "type")
                valid = False
                continue
            if not item:
                self.at_value(path + (index,), "must not be empty", "empty")
                valid = False
                continue
            result = self._item(key, item, path + (index,))
            if result is _INVALID:
                valid = False
            else:
                items.append(result)
        return tuple(items) if valid else _INVALID

    def _check_users(self, key: Key, value: Any, path: KeyPath) -> Any:
        items = value if isinstance(value, list) else [value]
        uids = []
        valid = True
        for index, item in enumerate(items):
            where = path + (index,) if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
                shown = "an empty string" if item == "" else f"{toml_type(item)} ({show(item)})"
                self.at_value(where, f"expected a user name (string) or a uid (integer), got {shown}", "type")
                valid = False
                continue
            try:
                uids.append(resolve_protect_user(item))
            except ValueError as exc:
                self.at_value(where, str(exc), "unknown-user" if isinstance(item, str) else "range")
                valid = False
        return tuple(uids) if valid else _INVALID

    def _check_integers(self, key: Key, value: Any, path: KeyPath) -> Any:
        if not isinstance(value, list):
            self.at_value(path, f"expected an array of integers, got {toml_type(value)} ({show(value)})", "type")
            return _INVALID
        items = []
        valid = True
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                self.at_value(path + (index,), f"expected an integer, got {toml_type(item)} ({show(item)})", "type")
                valid = False
            elif self._range(key, item, path + (index,)) is _INVALID:
                valid = False
            else:
                items.append(item)
        return tuple(items) if valid else _INVALID


_INVALID = object()


def _item_code(key: Key) -> str:
    if key.type == "regex":
        return "regex"
    if key.item_check in (check_comm_glob, check_exe_glob, check_cgroup_glob, check_unit_glob):
        return "glob"
    return "format"


def _choices(key: Key) -> str:
    return ", ".join(f"'{choice}'" for choice in key.choices)


def _range_text(key: Key) -> str:
    """'-20..19', 'at least 1', 'more than 0 and at most 100'."""

    def number(value: float) -> str:
        if key.type in ("duration", "duration-or-never", "threshold"):
            return format_duration(value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    low, high = key.minimum, key.maximum
    if low is not None and high is not None and not key.exclusive_minimum:
        return f"{number(low)}..{number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{'more than' if key.exclusive_minimum else 'at least'} {number(low)}")
    if high is not None:
        parts.append(f"at most {number(high)}")
    return " and ".join(parts)


# -- JSON Schema ------------------------------------------------------------------------------

def json_schema(kind: str = "policy") -> dict:
    """A JSON Schema (draft-07, which taplo and Even Better TOML read) of a policy or config file."""
    spec = POLICY_FILE if kind == "policy" else CONFIG_FILE
    schema = _schema_of(spec)
    title = "remediator policy file" if kind == "policy" else "remediator daemon config (remediator.toml)"
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": title, **schema}


def _schema_of(key: Key) -> dict:
    schema: dict[str, Any] = {}
    if key.doc:
        schema["description"] = key.doc
    if key.has_default:
        schema["default"] = key.default
    kind = key.type
    if kind in ("table", "table-array"):
        table: dict[str, Any] = {
            "type": "object",
            "properties": {child.name: _schema_of(child) for child in key.keys},
            "additionalProperties": False,
        }
        required = [child.name for child in key.keys if child.required]
        if required:
            table["required"] = required
        if key.exactly_one_of:
            table["oneOf"] = [{"required": [name]} for name in key.exactly_one_of]
        if key.keys is TRIGGER_KEYS:
            # always = true excludes tail and offender; otherwise both are needed.
            table["if"] = {"properties": {"always": {"const": True}}, "required": ["always"]}
            table["then"] = {"not": {"anyOf": [{"required": ["tail"]}, {"required": ["offender"]}]}}
            table["else"] = {"required": ["tail", "offender"]}
        if key.keys is OFFENDER_KEYS:
            table["anyOf"] = [{"required": ["cpu"]}, {"required": ["blame_share"]}]
        if kind == "table":
            schema.update(table)
        else:
            schema.update({"type": "array", "items": table})
            if not key.allow_empty:
                schema["minItems"] = 1
    elif kind in ("string", "regex"):
        schema.update({"type": "string", "minLength": 1})
        if key.pattern:
            schema["pattern"] = key.pattern
    elif kind == "enum":
        schema.update({"type": "string", "enum": list(key.choices)})
    elif kind == "boolean":
        schema["type"] = "boolean"
    elif kind in ("integer", "number"):
        schema["type"] = kind
        _schema_range(schema, key)
    elif kind == "duration":
        schema.update({"type": "string", "pattern": DURATION_PATTERN})
    elif kind == "duration-or-never":
        schema.update({"type": "string", "pattern": "^(never|" + DURATION_PATTERN[1:-1] + ")$"})
    elif kind == "threshold":
        schema.update({"type": "string", "pattern": "^(" + DURATION_PATTERN[1:-1] + "|" + BASELINE_PATTERN[1:-1] + ")$"})
    elif kind == "cpus":
        schema.update({"type": "string", "pattern": f"^({key.keyword}|{CPULIST_PATTERN})$"})
    elif kind == "strings":
        item = {"type": "string", "minLength": 1}
        array: dict[str, Any] = {"type": "array", "items": item}
        if not key.allow_empty:
            array["minItems"] = 1
        schema["anyOf"] = [dict(item), array]
    elif kind == "users":
        item = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 0}]}
        schema["anyOf"] = [dict(item), {"type": "array", "items": item}]
    elif kind == "integers":
        item = {"type": "integer"}
        _schema_range(item, key)
        schema.update({"type": "array", "items": item})
    else:  # pragma: no cover - a new type must be added here
        raise AssertionError(f"no JSON Schema for type {kind}")
    return schema


def _schema_range(schema: dict, key: Key) -> None:
    if key.minimum is not None:
        schema["exclusiveMinimum" if key.exclusive_minimum else "minimum"] = key.minimum
    if key.maximum is not None:
        schema["maximum"] = key.maximum


# -- reference documentation ---------------------------------------------------------------------

REFERENCE_BEGIN = "<!-- BEGIN KEY REFERENCE (generated by `remediator policy schema --format markdown`; do not edit) -->"
REFERENCE_END = "<!-- END KEY REFERENCE -->"


def reference_markdown() -> str:
    """Key tables for docs/policy-format.md, one per TOML table, derived from the format description."""
    lines = [REFERENCE_BEGIN, ""]
    lines += _tables_markdown(POLICY_FILE, "", "Policy files (`policies/*.toml`)")
    lines += _tables_markdown(CONFIG_FILE, "", "Config file (`remediator.toml`)")
    lines.append(REFERENCE_END)
    return "\n".join(lines) + "\n"


def _tables_markdown(spec: Key, prefix: str, title: str) -> list[str]:
    lines = [f"### {title}", ""]
    for header, table in _walk_tables(spec, prefix):
        lines.append(f"#### `{header}`" if header else "#### top level")
        lines.append("")
        lines.append(table.doc)
        if table.exactly_one_of:
            lines.append(f"Exactly one of {', '.join(f'`{n}`' for n in table.exactly_one_of)} per step.")
        lines.append("")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for key in table.keys:
            lines.append(f"| `{key.name}` | {_type_text(key)} | {_default_text(key)} | {key.doc} |")
        lines.append("")
    return lines


def _walk_tables(spec: Key, prefix: str):
    if spec.type == "table-array":
        yield f"[[{prefix}]]", spec
    else:
        yield (f"[{prefix}]" if prefix else ""), spec
    for child in spec.keys:
        if child.type in ("table", "table-array"):
            yield from _walk_tables(child, f"{prefix}.{child.name}" if prefix else child.name)


def _type_text(key: Key) -> str:
    if key.type == "enum":
        return "string: " + " \\| ".join(f"`{c}`" for c in key.choices)
    if key.type == "cpus":
        return f'CPU list or `"{key.keyword}"`'
    text = TYPES[key.type]
    if key.minimum is not None or key.maximum is not None:
        text += f", {_range_text(key)}"
    return text


def _default_text(key: Key) -> str:
    if key.required:
        return "required"
    if key.has_default:
        return f"`{_toml_literal(key.default)}`"
    return "none"


def _toml_literal(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    return show(value)
