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
import os
from pathlib import Path

STATE_SUFFIX = ".engine-state.json"


def state_path_for(journal_path: Path) -> Path:
    return journal_path.with_name(journal_path.name + STATE_SUFFIX)


def current_boot_id(proc_root: str | Path = "/proc") -> str:
    try:
        return Path(proc_root, "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def write_durably(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, then fsync (the caller closes it and renames it into place)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def save_state(path: Path, engine_state: dict, boot_id: str) -> None:
    """Replace the state file; raises OSError (the caller counts it and carries on)."""
    data = json.dumps({"boot_id": boot_id, "engine": engine_state}, separators=(",", ":")).encode()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            write_durably(fd, data)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except OSError:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_state(path: Path, boot_id: str) -> tuple[dict | None, str]:
    """(the engine's saved state, "") or (None, why there is none to use)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "none saved"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return None, f"{path}: not JSON ({exc}): ignored"
    if not isinstance(data, dict) or not isinstance(data.get("engine"), dict):
        return None, f"{path}: not an engine state file: ignored"
    if not boot_id or data.get("boot_id") != boot_id:
        return None, f"{path}: saved before the last boot: ignored (its times are that boot's)"
    return data["engine"], ""
