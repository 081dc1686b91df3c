"""Another git ref's code, for the benchmarks that run it beside this tree's (--old-ref): its
remediator/ and probes/ extracted into a directory, and the environment that makes a Python
process import and load those instead of this tree's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def extract(ref: str, into: Path) -> Path:
    """`ref`'s remediator/ and probes/ into the directory `into`; returns `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "remediator", "probes"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def environment(tree: Path) -> dict[str, str]:
    """This process's environment, with `tree`'s remediator package and probes in place of ours."""
    return {**os.environ, "PYTHONPATH": str(tree), "REMEDIATOR_PROBES_DIR": str(tree / "probes")}
