"""The daemon's config file (remediator.toml): parse, check, compile to a frozen `DaemonConfig`.

The keys are described once in schema.CONFIG_FILE; this module adds what needs more than one key
(protect must select something, policy paths must exist) and resolves paths relative to the file.
Also here: reading any TOML input into a Document with diagnostics (through trustedfs, which
refuses to a privileged caller a file others could change).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpulist import format_cpulist
from .errors import Location
from .schema import CONFIG_FILE, Checker, Diagnostic, PolicyErrors, has_errors
from .selectors import ProtectSelectors
from .tomlpos import Document, TomlSyntaxError, format_key_path, parse
from .trustedfs import Trust, UntrustedPath, read_bytes

CONFIG_FILE_NAME = "remediator.toml"
CONFIG_TABLES = frozenset({"protect", "daemon", "recording"})


@dataclass(frozen=True)
class DaemonConfig:
    path: Path
    protect: ProtectSelectors
    request_cpus: frozenset[int] | None  # None = auto (from the protected processes' cgroups, see placement)
    mode: str  # "live" | "dry-run"
    source: str  # "bpf" | "auto" | "procfs": where samples come from (see sources.open_source)
    tick_s: float
    policy_paths: tuple[Path, ...]  # resolved relative to the config file
    journal_path: Path
    audit_path: Path
    on_start: str  # "restore" | "keep"
    revert_on_exit: bool
    max_changes_per_minute: int
    warnings: tuple[Diagnostic, ...] = ()  # logged at start and on reload (e.g. comm without users)
    recording_path: Path | None = None  # [recording]: the daemon's rolling recording (see recording.py)
    recording_max_bytes: int = 268435456

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "protect": self.protect.describe(),
            "request_cpus": "auto" if self.request_cpus is None else format_cpulist(self.request_cpus),
            "mode": self.mode,
            "source": self.source,
            "tick_s": self.tick_s,
            "policy_paths": [str(p) for p in self.policy_paths],
            "journal_path": str(self.journal_path),
            "audit_path": str(self.audit_path),
            "on_start": self.on_start,
            "revert_on_exit": self.revert_on_exit,
            "max_changes_per_minute": self.max_changes_per_minute,
            "recording_path": None if self.recording_path is None else str(self.recording_path),
            "recording_max_bytes": self.recording_max_bytes,
        }


# -- reading ----------------------------------------------------------------------------------

def read_document(
    path: Path | str, display: str | None = None, *, trust: Trust | None = None, refuse_untrusted: bool = False
) -> tuple[Document | None, list[Diagnostic]]:
    """Read (through trustedfs) and parse one TOML file; (None, [diagnostic]) when it cannot be read
    or parsed, or is not to be trusted (raised as UntrustedPath instead with `refuse_untrusted`)."""
    shown = display if display is not None else str(path)
    try:
        raw = read_bytes(path, trust, shown=shown)
    except UntrustedPath as exc:
        if refuse_untrusted:
            raise
        return None, [Diagnostic(Location(shown), "error", f"refusing to read it: {exc.reason}", "untrusted")]
    except OSError as exc:
        reason = exc.strerror or str(exc)
        code = "not-found" if isinstance(exc, FileNotFoundError) else "unreadable"
        return None, [Diagnostic(Location(shown), "error", f"cannot read: {reason}", code)]
    return parse_source(raw, shown)


def parse_source(source: bytes | str, display: str) -> tuple[Document | None, list[Diagnostic]]:
    try:
        return parse(source, display), []
    except TomlSyntaxError as exc:
        return None, [Diagnostic(exc.location, "error", exc.message, "syntax")]


def looks_like_config(document: Document | None, display: str) -> bool:
    """Config files are recognised by name or by their [protect] / [daemon] tables."""
    if Path(display).name == CONFIG_FILE_NAME:
        return True
    return document is not None and "policy" not in document.data and bool(CONFIG_TABLES & document.data.keys())


# -- compile ----------------------------------------------------------------------------------

def compile_config(document: Document, base: Path | None = None) -> tuple[DaemonConfig | None, list[Diagnostic]]:
    """Check a config document; the DaemonConfig when it has no error. Paths resolve against `base`
    (default: the directory of the document's path)."""
    checker = Checker(document)
    clean = checker.check_table(CONFIG_FILE, document.data, ())
    diagnostics = checker.diagnostics
    if clean is None:
        return None, diagnostics
    config_path = Path(document.path)
    base = base if base is not None else config_path.absolute().parent
    # Checks across keys run on the sections that are valid, so one pass reports as much as it can.
    protect_values: dict[str, Any] = clean.get("protect") or {}
    selectors = None
    if all(name in protect_values for name in ("pids", "comm", "cgroup", "unit", "users")):
        selectors = ProtectSelectors.build(
            pids=protect_values["pids"], comms=protect_values["comm"], cgroups=protect_values["cgroup"],
            units=protect_values["unit"], users=protect_values["users"],
        )
        if selectors.comms and not selectors.users:
            diagnostics.append(
                Diagnostic(
                    document.value_location(("protect", "comm")),
                    "warning",
                    "protect.comm: any process can set its own comm, so any local user can make a process of theirs "
                    "protected (exempt from every policy) by naming it so; give protect.users, the users the service runs "
                    'as (e.g. users = ["www-data"])',
                    "comm-without-users",
                    "protect.comm",
                )
            )
        if selectors.empty:
            diagnostics.append(
                Diagnostic(
                    document.value_location(("protect",)),
                    "error",
                    "protect: selects nothing; give at least one of pids, comm, cgroup, unit (the daemon guards their latency)",
                    "empty-match",
                    "protect",
                )
            )
    daemon: dict[str, Any] = clean.get("daemon") or {}
    policy_paths = []
    for index, item in enumerate(daemon.get("policies", ())):
        resolved = _resolve(base, item)
        policy_paths.append(resolved)
        if not resolved.exists():
            key_path = _policies_key_path(document, index)
            what = item if "policies" in key_path else f'the default "{item}"'
            diagnostics.append(
                Diagnostic(
                    document.value_location(key_path),
                    "error",
                    f"daemon.policies: {what} does not exist (resolved to {resolved})",
                    "not-found",
                    "daemon.policies",
                )
            )
    if has_errors(diagnostics) or selectors is None:
        return None, diagnostics
    request = protect_values["request_cpus"]
    recording: dict[str, Any] = clean.get("recording") or {}
    config = DaemonConfig(
        path=config_path,
        protect=selectors,
        request_cpus=None if request == "auto" else frozenset(request),
        mode=daemon["mode"],
        source=daemon["source"],
        tick_s=daemon["tick"],
        policy_paths=tuple(policy_paths),
        journal_path=_resolve(base, daemon["journal"]),
        audit_path=_resolve(base, daemon["audit_log"]),
        on_start=daemon["on_start"],
        revert_on_exit=daemon["revert_on_exit"],
        max_changes_per_minute=clean["limits"]["max_changes_per_minute"],
        warnings=tuple(d for d in diagnostics if d.severity == "warning"),
        recording_path=_resolve(base, recording["path"]) if recording.get("path") else None,
        recording_max_bytes=recording.get("max_bytes", 268435456),
    )
    return config, diagnostics


def _policies_key_path(document: Document, index: int) -> tuple:
    """Where the policies entry is written; the [daemon] table (or the file) when it is the default."""
    daemon = document.data.get("daemon")
    written = daemon.get("policies") if isinstance(daemon, dict) else None
    if isinstance(written, list):
        return ("daemon", "policies", index)
    if written is not None:
        return ("daemon", "policies")
    return ("daemon",)


def _resolve(base: Path, item: str) -> Path:
    return Path(os.path.normpath(base / os.path.expanduser(item)))


def host_cpu_warnings(document: Document, key_path: tuple, cpus: frozenset[int], online: frozenset[int]) -> list[Diagnostic]:
    """A warning when an explicit CPU list names CPUs this host does not have online."""
    missing = cpus - online
    if not missing:
        return []
    what = "CPU {} is" if len(missing) == 1 else "CPUs {} are"
    return [
        Diagnostic(
            document.value_location(key_path),
            "warning",
            f"{format_key_path(key_path)}: {what.format(format_cpulist(missing))} not online on this host (online: {format_cpulist(online) or 'none'})",
            "host-cpu",
            format_key_path(key_path),
        )
    ]


def config_diagnostics(document: Document, online_cpus: frozenset[int] | None = None) -> tuple[DaemonConfig | None, list[Diagnostic]]:
    """compile_config plus the host check of an explicit request_cpus."""
    config, diagnostics = compile_config(document)
    if config is not None and online_cpus is not None and config.request_cpus is not None:
        diagnostics += host_cpu_warnings(document, ("protect", "request_cpus"), config.request_cpus, online_cpus)
    return config, diagnostics


def load_config(path: Path | str, trust: Trust | None = None) -> DaemonConfig:
    """Load remediator.toml; raise PolicyErrors listing every located problem, or UntrustedPath
    when a privileged caller must not act on it (see trustedfs; `trust` defaults to this process's).
    Ownership and mode are checked on the descriptor the file is then read from."""
    document, diagnostics = read_document(path, trust=trust, refuse_untrusted=True)
    if document is None:
        raise PolicyErrors(diagnostics)
    config, diagnostics = compile_config(document)
    if config is None:
        raise PolicyErrors(diagnostics)
    return config
