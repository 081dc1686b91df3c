"""Durations as policies and configs write them ("250ms", "5s", "10m") and as messages show them.

Apart from the TOML stack (schema, tomlpos), so the data model and the actuators can use them.
"""

from __future__ import annotations

import re
from decimal import Decimal

DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(us|ms|s|m|h)$"
DURATION_RE = re.compile(DURATION_PATTERN)
_UNIT_SECONDS = {"us": Decimal("0.000001"), "ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def parse_duration(text: str) -> float:
    """"250ms" -> 0.25 (seconds). Raises ValueError for anything else.

    Decimal arithmetic, so "30us" is the float nearest 30e-6 (30 * 1e-6 in floats is not).
    """
    # fullmatch: the pattern's "$" (kept for JSON Schema) also matches before a final newline.
    match = DURATION_RE.fullmatch(text)
    if not match:
        raise ValueError(text)
    return float(Decimal(text[: match.start(2)]) * _UNIT_SECONDS[match.group(2)])


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if seconds >= size and abs(seconds / size - round(seconds / size)) < 1e-9:
            return f"{round(seconds / size)}{unit}"
    return f"{seconds * 1e6:g}us"
