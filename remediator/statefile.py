"""The engine's state across restarts: a small JSON file beside the journal, replaced atomically.

A separate file rather than records in the journal: the journal holds originals (what to give
back) and its format is its own; this file holds counters and ladder positions (what not to do
again), is rewritten whole when they change, and a lost or stale one costs only a fresh start of
the caps, never a wrong restore. Written as temp file, fsync, rename, fsync of the directory, so a
crash leaves the old file or the new one. Saved with the boot id: engine times are CLOCK_MONOTONIC,
meaningful only within the boot that wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .trustedfs import Trust, TrustedDirectory, UntrustedPath, read_bytes

STATE_SUFFIX = ".engine-state.json"


def state_path_for(journal_path: Path) -> Path:
    return journal_path.with_name(journal_path.name + STATE_SUFFIX)


def current_boot_id(proc_root: str | Path = "/proc") -> str:
    try:
        return Path(proc_root, "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def save_state(path: Path, engine_state: dict, boot_id: str, directory: TrustedDirectory | None = None) -> None:
    """Replace the state file; raises OSError or UntrustedPath (the caller counts either and
    carries on). Every step goes through `directory`'s descriptor: the journal's, checked and held
    open (None: the file's directory, checked now), so no path is walked again after the check and
    nothing is written through a symlink."""
    data = json.dumps({"boot_id": boot_id, "engine": engine_state}, separators=(",", ":")).encode()
    if directory is not None:
        directory.replace(path.name, data)
        return
    with TrustedDirectory(path.parent) as held:
        held.replace(path.name, data)


def load_state(path: Path, boot_id: str, trust: Trust | None = None) -> tuple[dict | None, str]:
    """(the engine's saved state, "") or (None, why there is none to use). Read as the journal is
    (trustedfs): a file another user could write would let them reset the caps and cooldowns it
    keeps, and a FIFO there would hang the reader."""
    try:
        raw = read_bytes(path, trust)
    except FileNotFoundError:
        return None, "none saved"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    except UntrustedPath as exc:
        return None, f"{exc}: ignored"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return None, f"{path}: not JSON ({exc}): ignored"
    if not isinstance(data, dict) or not isinstance(data.get("engine"), dict):
        return None, f"{path}: not an engine state file: ignored"
    if not boot_id or data.get("boot_id") != boot_id:
        return None, f"{path}: saved before the last boot: ignored (its times are that boot's)"
    return data["engine"], ""
